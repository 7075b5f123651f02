"""The engine on one GPU against the machine's own limits and against HF transformers.

One command, one process, everything measured in the same run:

1. ceilings: device-to-device copy bandwidth and bf16 matmul 8192^3
   (`pdserve.bench.micro.gpu_kernels`);
2. decode step (model + sampling, CUDA graphs, fused kernels) of a random-weight
   Llama-3.1-8B shape at batch 1/8/32/128 with 1k-token contexts: median of CUDA-event
   timed steps, and achieved bandwidth = (weight bytes + KV bytes read) / step time;
   also the full `LLMEngine.step()` (scheduler, detokenizer included), eager decode without
   graphs, and the unfused reference layers under graphs (before/after the fused kernels);
   RoPE + K/V cache write as one kernel (default) against two (rope, then write_kv),
   timed back to back (off, on) under graphs at batch 1/8/32, with a batch-1 kernel profile
   of the off variant (kernel launches per step before/after);
   the Triton GEMV for <= 8 rows against cuBLAS (`gemv_ab`): each 8B projection shape
   alone at 1 and 8 rows over a block-size sweep (the best config per shape is installed),
   then decode at batch 1/8 with cuBLAS, with the GEMV for q|k|v and o_proj (weights
   <= 64 MiB), and with it for every dense() product, each with a batch-1 profile;
3. a kernel profile of the decode step (where the time goes);
4. prefill of 512/2048/8192 tokens -> TFLOP/s (2 x linear params x tokens + causal
   attention; the LM head only for the sampled row) as a fraction of the matmul rate;
5. attention kernels alone: split-K decode at batch 32 / 4k context against copy
   bandwidth, and the prefill kernel against `F.scaled_dot_product_attention`;
6. HF transformers on the same weights and GPU: bf16 correctness (DESIGN.md's logprob-
   closeness rule) and its decode step at batch 1/8/32 (manual loop with its KV cache).

Run on the GPU machine: `python -m pdserve.bench.micro.gpu_engine --out gpu_engine.json`
(`--sections rope_write_kv_ab` or `gemv_ab` for one comparison alone; `--help` lists the
sections).
Markdown tables go to stdout, every number to the JSON file.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time
import traceback

import torch

from pdserve.bench.micro import gpu_kernels
from pdserve.bench.micro.gpu_kernels import time_ms
from pdserve.engine.kv_connector import NoKVConnector
from pdserve.messages import blocks_for

BLOCK = 16


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--batches", type=_ints, default=[1, 8, 32, 128])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--prefill", type=_ints, default=[512, 2048, 8192])
    p.add_argument("--hf-batches", type=_ints, default=[1, 8, 32])
    p.add_argument("--steps", type=int, default=50, help="timed decode steps per point")
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-unfused", action="store_true")
    p.add_argument("--skip-rope-write-kv-ab", action="store_true",
                   help="skip timing the fused RoPE + K/V write against two kernels")
    p.add_argument("--sections", type=_names, default=None,
                   help="comma-separated subset to run, in this order: " + ", ".join(SECTIONS))
    p.add_argument("--executor", choices=("uniproc", "rank-group"), default="uniproc",
                   help="rank-group: the engine drives a one-rank group through "
                   "MultiprocExecutor (what a cluster worker with tp/pp runs), to compare its "
                   "step overhead with the in-process executor")
    p.add_argument("--out", default="gpu_engine.json")
    args = p.parse_args(argv)
    unknown = set(args.sections or ()) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


SECTIONS = ("fused_decode", "fused_prefill", "profiles", "eager_decode", "attention", "repeat",
            "rope_write_kv_ab", "gemv_ab", "hf", "eager_split_plan", "unfused")


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# ---- engine set-up ---------------------------------------------------------------------------


def _executor(args, config):
    """None (the engine's in-process executor) or the driver of a one-rank group."""
    if args.executor == "uniproc":
        return None
    import socket

    from pdserve.engine.executor.group import init_rank_group
    from pdserve.engine.executor.multiproc import MultiprocExecutor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    group = init_rank_group(0, 1, f"tcp://127.0.0.1:{port}", "cuda")
    return MultiprocExecutor(config, group)


def build_engine(args):
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.llm_engine import LLMEngine

    longest = max(args.prefill)
    tokens = max(args.batches) * (args.context + 64) + longest + 64
    config = EngineConfig(
        model=args.model, dtype="bfloat16", device="cuda",
        cache=CacheConfig(block_size=BLOCK, num_blocks=blocks_for(tokens, BLOCK) + 64,
                          enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=max(args.batches),
                                  max_num_batched_tokens=longest,
                                  max_model_len=args.max_model_len),
        enable_cuda_graphs=True, enable_fused_kernels=True,
    )
    t0 = time.perf_counter()
    engine = LLMEngine(config, kv_connector=RandomKV(), executor=_executor(args, config))
    torch.cuda.synchronize()
    init_s = time.perf_counter() - t0
    engine.kv_cache.normal_()  # random KV: zeros can time faster than real data
    return engine, init_s


def recapture(engine, fused: bool, tiles=None, rope_write_kv: bool = True) -> None:
    """Switch the model between fused and reference layers and recapture the graphs
    (`tiles`: another split plan for the graphs' decode attention; `rope_write_kv`: on the
    fused path, RoPE and the K/V cache write in one kernel, or in two)."""
    from pdserve.engine.cuda_graph import DecodeGraphRunner
    from pdserve.engine.models.fused_llama import set_fused_kernels, set_rope_write_kv_fusion

    engine.runner.decode_graphs = None
    gc.collect()
    torch.cuda.empty_cache()
    set_fused_kernels(engine.model, fused)
    set_rope_write_kv_fusion(engine.model, rope_write_kv)
    engine.runner.decode_graphs = DecodeGraphRunner.maybe_create(
        engine.runner, engine.max_model_len, engine.config.scheduler.max_num_seqs, tiles)


class RandomKV(NoKVConnector):
    """Stands in for a prefill worker: the prompt tokens of requests `start_decoding` adopts
    count as loaded (their blocks hold the pool's random KV); other requests prefill."""

    def __init__(self) -> None:
        self.adopting: set[str] = set()

    def num_external_tokens(self, seq, num_local_tokens: int) -> int:
        if seq.request_id not in self.adopting:
            return 0
        return seq.num_prompt_tokens - num_local_tokens


def start_decoding(engine, batch: int, context: int, tag: str) -> list:
    """`batch` requests whose `context`-token prompts are 'already prefilled' (random KV in
    freshly allocated blocks), each with its first token: the next step is pure decode."""
    from pdserve.engine.sampler import SampleResult
    from pdserve.engine.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(batch)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=4096, ignore_eos=True)
    seqs = []
    for i in range(batch):
        prompt = torch.randint(0, vocab, (context,), generator=gen).tolist()
        rid = f"{tag}-{batch}-{i}"
        engine.reserve(rid, context + 64, 0)  # 64 decode tokens need no new block
        engine.connector.adopting.add(rid)
        engine.adopt(rid, prompt, params, i, SampleResult(prompt[-1], None, []))
        engine.connector.adopting.discard(rid)
        seqs.append(engine.sequence(rid))
    return seqs


def decode_bytes(engine, batch: int, context: int) -> tuple[float, float]:
    """(weight bytes, KV bytes) one decode step reads: every weight once except the input
    embedding, of which only `batch` rows are gathered; K and V of every context token."""
    model, mc = engine.model, engine.model_config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.embed_tokens.weight
    if not mc.tie_word_embeddings:
        weights -= (emb.shape[0] - batch) * emb.shape[1] * emb.element_size()
    kv = batch * (context + 1) * mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * 2
    return weights, kv


def measure_decode(engine, batch: int, args, ceil: dict, label: str, full_step: bool) -> dict:
    from pdserve.engine.executor.step import StepInput
    from pdserve.engine.scheduler import ScheduledSeq

    seqs = start_decoding(engine, batch, args.context, label)
    items = StepInput.from_batch([ScheduledSeq(s, 1) for s in seqs], engine.layout.block_size)
    reqs = [engine.sample_request(s) for s in seqs]

    def step():
        engine.sampler(engine.runner.execute(items), reqs)

    ms = time_ms(step, warmup=5, iters=args.steps)
    w, kv = decode_bytes(engine, batch, args.context)
    row = {"variant": label, "batch": batch, "context": args.context, "step_ms": ms,
           "tokens_per_s": batch / ms * 1e3, "weight_GB": w / 1e9, "kv_GB": kv / 1e9,
           "achieved_GBps": (w + kv) / ms / 1e6}
    row["frac_copy_bw"] = row["achieved_GBps"] / ceil["copy_GBps"]
    if full_step:  # the whole engine step, context growing by one token a step
        row["engine_step_ms"] = time_ms(engine.step, warmup=3, iters=min(args.steps, 40))
    for s in seqs:
        engine.abort(s.request_id)
    return row


def measure_prefill(engine, tokens: int, ceil: dict, label: str) -> dict:
    from pdserve.engine.executor.step import StepInput
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.engine.scheduler import ScheduledSeq
    from pdserve.engine.sequence import Sequence

    mc, model = engine.model_config, engine.model
    gen = torch.Generator().manual_seed(tokens)
    prompt = torch.randint(0, mc.vocab_size, (tokens,), generator=gen).tolist()
    seq = Sequence(f"prefill-{tokens}", prompt, SamplingParams(temperature=0), 0)
    seq.block_ids = engine.blocks.allocate(blocks_for(tokens + 1, BLOCK))
    items = StepInput.from_batch([ScheduledSeq(seq, tokens)], engine.layout.block_size)
    reqs = [engine.sample_request(seq)]
    ms = time_ms(lambda: engine.sampler(engine.runner.execute(items), reqs), warmup=2, iters=5)
    engine.blocks.free(seq.block_ids)
    linear = sum(
        m.weight.numel() for layer in model.layers
        for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                  layer.mlp.down_proj)
    )
    attn = 4 * mc.num_heads * mc.head_dim * tokens * (tokens + 1) / 2 * mc.num_layers
    flops = 2 * linear * tokens + 2 * model.lm_head.weight.numel() + attn
    tflops = flops / ms / 1e9
    return {"variant": label, "tokens": tokens, "ms": ms, "TFLOP": flops / 1e12,
            "TFLOPs": tflops, "frac_matmul": tflops / ceil["matmul_TFLOPs"],
            "tokens_per_s": tokens / ms * 1e3}


def profile_decode(engine, batch: int, args, variant: str = "graphs+fused") -> dict:
    from pdserve.engine.executor.step import StepInput
    from pdserve.engine.scheduler import ScheduledSeq

    seqs = start_decoding(engine, batch, args.context, "profile")
    items = StepInput.from_batch([ScheduledSeq(s, 1) for s in seqs], engine.layout.block_size)
    reqs = [engine.sample_request(s) for s in seqs]
    prof = gpu_kernels.kernel_profile(lambda: engine.sampler(engine.runner.execute(items), reqs))
    if prof["kernel_us_per_step"] == 0:  # graph kernels not traced: profile eager instead
        graphs, engine.runner.decode_graphs = engine.runner.decode_graphs, None
        prof = gpu_kernels.kernel_profile(
            lambda: engine.sampler(engine.runner.execute(items), reqs))
        prof["note"] = "eager (graph replays were not traced)"
        engine.runner.decode_graphs = graphs
    for s in seqs:
        engine.abort(s.request_id)
    prof["batch"] = batch
    prof["variant"] = variant
    return prof


def profile_prefill(engine, tokens: int) -> dict:
    """Kernel time of a prefill step against its wall time: where they differ, the step is
    bound by the host launching kernels, not by the GPU."""
    from pdserve.engine.executor.step import StepInput
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.engine.scheduler import ScheduledSeq
    from pdserve.engine.sequence import Sequence

    gen = torch.Generator().manual_seed(tokens)
    prompt = torch.randint(0, engine.model_config.vocab_size, (tokens,), generator=gen).tolist()
    seq = Sequence(f"prefill-profile-{tokens}", prompt, SamplingParams(temperature=0), 0)
    seq.block_ids = engine.blocks.allocate(blocks_for(tokens + 1, BLOCK))
    items = StepInput.from_batch([ScheduledSeq(seq, tokens)], engine.layout.block_size)
    reqs = [engine.sample_request(seq)]

    def step():
        engine.sampler(engine.runner.execute(items), reqs)

    prof = gpu_kernels.kernel_profile(step, steps=3)
    wall = time_ms(step, warmup=1, iters=3)
    engine.blocks.free(seq.block_ids)
    return {"tokens": tokens, "step_ms": wall, "kernel_ms": prof["kernel_us_per_step"] / 1e3,
            "kernels": prof["kernel_launches_per_step"], "by_category_us": prof["by_category_us"]}


# ---- HF transformers -------------------------------------------------------------------------


def engine_generate(engine, prompts: list[list[int]], new_tokens: int):
    from pdserve.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, logprobs=5)
    outs = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"check-{i}", p, params)
        outs[f"check-{i}"] = ([], [], [])
    while engine.has_unfinished():
        for o in engine.step():
            toks, lps, tops = outs[o.request_id]
            toks += o.new_token_ids
            lps += [lp.logprob for lp in o.new_logprobs]
            tops += [[t for t, _ in lp.top] for lp in o.new_logprobs]
    return [outs[f"check-{i}"] for i in range(len(prompts))]


def hf_correctness(engine, hf, n_prompts: int = 4, prompt_len: int = 64, new: int = 16):
    from pdserve.engine.loader.hf_export import closeness_violations, teacher_forced_logprobs

    gen = torch.Generator().manual_seed(5)
    vocab = engine.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
               for _ in range(n_prompts)]
    bad, agree, total, max_diff = [], 0, 0, 0.0
    for prompt, (toks, lps, tops) in zip(prompts, engine_generate(engine, prompts, new)):
        ref = teacher_forced_logprobs(hf, prompt, toks)
        bad += closeness_violations(toks, tops, ref)
        agree += sum(t == r for t, r in zip(toks, ref.argmax(-1).tolist()))
        total += len(toks)
        for i, (t, lp) in enumerate(zip(toks, lps)):
            max_diff = max(max_diff, abs(lp - ref[i, t].item()))
    return {"tokens": total, "greedy_equal": agree, "violations": bad,
            "max_logprob_diff": max_diff, "passed": not bad}


@torch.inference_mode()
def hf_decode(hf, batch: int, context: int, vocab: int, steps: int) -> dict:
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, context), generator=gen).cuda()
    out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
    state = {"past": out.past_key_values, "tok": out.logits[:, -1].argmax(-1, keepdim=True)}

    def step():
        o = hf(input_ids=state["tok"], past_key_values=state["past"], use_cache=True)
        state["past"] = o.past_key_values
        state["tok"] = o.logits[:, -1].argmax(-1, keepdim=True)
        state["tok"].tolist()  # a generate loop checks its stop criteria on the host

    ms = time_ms(step, warmup=3, iters=steps)
    return {"batch": batch, "context": context, "step_ms": ms, "tokens_per_s": batch / ms * 1e3}


# ---- report ----------------------------------------------------------------------------------


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("–" if v is None else format(v, fmt) if fmt else str(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def _by_variant(rows: list[dict]) -> str:
    """Decode step ms, one row per variant, one column per batch (the before/after view)."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    ms = {(r["variant"], r["batch"]): r["step_ms"] for r in rows}
    lines = ["| variant | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for v in variants:
        cells = [f"{ms[v, b]:.2f}" if (v, b) in ms else "–" for b in batches]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(res: dict) -> str:
    c = res["ceilings"]
    out = [f"## GPU engine ({res['device']}, {res['date']})", "",
           f"Ceilings: copy {c['copy_GBps']:.0f} GB/s (read+write), "
           f"bf16 matmul 8192^3 {c['matmul_TFLOPs']:.0f} TFLOP/s. "
           f"Engine start-up {res['engine_init_s']:.1f} s.", "", "### Decode step", "",
           _by_variant(res["decode"]), "",
           _table(res["decode"], [
               ("variant", "variant", ""), ("batch", "batch", "d"),
               ("step_ms", "model+sampling ms", ".2f"), ("engine_step_ms", "engine.step ms", ".2f"),
               ("tokens_per_s", "tok/s", ".0f"), ("weight_GB", "weights GB", ".2f"),
               ("kv_GB", "KV GB", ".2f"), ("achieved_GBps", "GB/s", ".0f"),
               ("frac_copy_bw", "of copy BW", ".1%"), ("hf_ms", "HF ms", ".1f"),
               ("speedup_vs_hf", "x HF", ".1f")]), "", "### Prefill", "",
           _table(res["prefill"], [
               ("variant", "variant", ""), ("tokens", "tokens", "d"), ("ms", "ms", ".1f"),
               ("TFLOP", "TFLOP", ".1f"), ("TFLOPs", "TFLOP/s", ".0f"),
               ("frac_matmul", "of matmul", ".1%"), ("tokens_per_s", "tok/s", ".0f")]),
           "", "### Attention kernels alone", ""]
    if "attention" not in res:
        out.append("(not measured)")
    else:
        d = res["attention"]["decode"]
        out.append(f"Decode, batch {d['batch']}, context {d['context']} ({d['kv_MB']:.0f} MB of "
                   f"K+V): Triton {d['triton_ms'] * 1e3:.0f} us = {d['triton_GBps']:.0f} GB/s "
                   f"({d['triton_GBps'] / c['copy_GBps']:.1%} of copy BW)"
                   + (f"; SDPA on contiguous K/V {d['sdpa_ms'] * 1e3:.0f} us = "
                      f"{d['sdpa_GBps']:.0f} GB/s" if "sdpa_ms" in d else "") + ".")
        out += ["", _table(res["attention"]["prefill"], [
            ("tokens", "prefill tokens", "d"), ("triton_ms", "Triton ms", ".2f"),
            ("triton_TFLOPs", "Triton TFLOP/s", ".0f"), ("sdpa_ms", "SDPA ms", ".2f"),
            ("sdpa_TFLOPs", "SDPA TFLOP/s", ".0f")])]
    if res.get("gemv_micro"):
        out += ["", "### Triton GEMV vs cuBLAS, each projection alone (graphs, weights "
                "beyond L2)", "",
                "| shape | in -> out | rows | cuBLAS us | cuBLAS of copy BW | Triton us "
                "(default cfg) | default of copy BW | best Triton us | best of copy BW "
                "| best config (kernel, BN, BK, warps, stages) | programs |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["gemv_micro"]:
            cb, best = r["cublas"], r["best"]
            dflt = next((t for t in r["triton"] if t.get("default") and "us" in t), None)
            cfg = best["config"] if best else None
            out.append(
                f"| {r['shape']} | {r['in']} -> {r['out']} | {r['rows']} | {cb['us']:.1f} | "
                f"{cb['frac_copy_bw']:.1%} | "
                + (f"{dflt['us']:.1f} | {dflt['frac_copy_bw']:.1%} | " if dflt else "– | – | ")
                + (f"{best['us']:.1f} | {best['frac_copy_bw']:.1%} | {cfg['kernel']}, "
                   f"{cfg['block_n']}, {cfg['block_k']}, {cfg['num_warps']}, "
                   f"{cfg['num_stages']} | {best['programs']} |" if best else "– | – | – | – |"))
    for prof in res.get("profiles", []):
        cats = sorted(prof["by_category_us"].items(), key=lambda kv: -kv[1])
        variant = prof.get("variant", "graphs+fused")
        step = next((r["step_ms"] for r in res["decode"] if r["batch"] == prof["batch"]
                     and r["variant"] == variant), None)
        gap = "" if step is None else (
            f"; step {step * 1e3:.0f} us, so {step * 1e3 - prof['kernel_us_per_step']:.0f} us "
            "between kernels (graph launch gaps, input copy, sampler sync)")
        out += ["", f"### Decode profile, {variant}, batch {prof['batch']} "
                f"({prof['kernel_launches_per_step']:.0f} kernels, "
                f"{prof['kernel_us_per_step']:.0f} us of kernel time per step{gap}"
                + (f", {prof['note']}" if "note" in prof else "") + ")", "",
                "| category | us/step |", "|---|---|"]
        out += [f"| {k} | {v:.0f} |" for k, v in cats]
        out += ["", "| top kernels | calls/step | us/step |", "|---|---|---|"]
        out += [f"| `{k['kernel'][:60]}` | {k['calls_per_step']:.0f} | {k['us_per_step']:.0f} |"
                for k in prof["top_kernels"][:10]]
    for p in res.get("prefill_profiles", []):
        out += ["", f"Prefill {p['tokens']} tokens: step {p['step_ms']:.1f} ms, kernels "
                f"{p['kernel_ms']:.1f} ms ({p['kernels']:.0f} launches): "
                + ", ".join(f"{k} {v / 1e3:.1f} ms" for k, v in
                            sorted(p["by_category_us"].items(), key=lambda kv: -kv[1]))]
    if "hf_correctness" in res:
        h = res["hf_correctness"]
        out += ["", f"bf16 vs HF (same random weights, teacher-forced): {h['greedy_equal']}/"
                f"{h['tokens']} greedy tokens equal, max logprob diff "
                f"{h['max_logprob_diff']:.3f}, closeness rule "
                f"{'passed' if h['passed'] else 'FAILED: ' + '; '.join(h['violations'][:3])}."]
    if res["errors"]:
        out += ["", f"{len(res['errors'])} section(s) failed; see `errors` in the JSON."]
    return "\n".join(out)


# ---- main ------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    res: dict = {"device": torch.cuda.get_device_name(), "args": vars(args),
                 "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                 "decode": [], "prefill": [], "profiles": [], "errors": []}
    res["ceilings"] = ceil = gpu_kernels.ceilings()
    print("ceilings", ceil, flush=True)
    engine, res["engine_init_s"] = build_engine(args)
    print(f"engine up in {res['engine_init_s']:.1f}s", flush=True)

    def decode(batches, label: str, full_step: bool = False) -> None:
        """Time decode at each batch size under `label` (the engine as it is set up now)."""
        for b in batches:
            res["decode"].append(measure_decode(engine, b, args, ceil, label, full_step))
            print(res["decode"][-1], flush=True)

    def fused_decode():
        decode(args.batches, "graphs+fused", full_step=True)

    def fused_prefill():
        for t in args.prefill:
            res["prefill"].append(measure_prefill(engine, t, ceil, "fused"))
            print(res["prefill"][-1], flush=True)

    def profiles():
        for b in (1, 32, 128):
            if b <= max(args.batches):
                res["profiles"].append(profile_decode(engine, b, args))
        res["prefill_profiles"] = [profile_prefill(engine, t) for t in (512, 2048)]

    def repeat():  # the same version timed again: the spread between runs is the noise
        decode((1, 8), "graphs+fused (repeat)")

    def eager_decode():
        graphs, engine.runner.decode_graphs = engine.runner.decode_graphs, None
        try:
            decode((1, 8), "eager+fused")
        finally:
            engine.runner.decode_graphs = graphs

    def attention():
        res["attention"] = {"decode": gpu_kernels.decode_attention(),
                            "prefill": [gpu_kernels.prefill_attention(t) for t in (2048, 8192)]}
        print(res["attention"], flush=True)

    def eager_split_plan():  # before/after the graphs' finer decode split plan
        recapture(engine, fused=True, tiles=engine.runner.backend.tiles)
        decode((1, 8, 32), "graphs+fused, eager split plan")

    def rope_write_kv_ab():
        """RoPE + K/V write as two kernels, then as one again, back to back, same graphs
        set-up: the difference is that fusion alone (repeat it to see the noise)."""
        batches = [b for b in (1, 8, 32) if b <= max(args.batches)]
        try:
            recapture(engine, fused=True, rope_write_kv=False)
            decode(batches, "graphs+fused, rope+write_kv separate")
            res["profiles"].append(profile_decode(
                engine, 1, args, "graphs+fused, rope+write_kv separate"))
        finally:
            recapture(engine, fused=True, rope_write_kv=True)
        decode(batches, "graphs+fused, rope+write_kv fused (A/B)")

    def gemv_ab():
        """cuBLAS, then the Triton GEMV for the small projections, then for all of dense()'s
        products, back to back, same graphs set-up; the switch is restored afterwards."""
        from pdserve.engine.layers import gemv as gemv_mod
        from pdserve.engine.layers import linear

        res["gemv_micro"] = micro = gpu_kernels.gemv_shapes(ceil)
        for row in micro:  # the sweep's best config for each shape goes into the A/B
            if row["best"] is not None:
                gemv_mod.set_config(row["out"], row["in"], row["rows"] == 1,
                                    gemv_mod.GemvConfig(**row["best"]["config"]))
        batches = [b for b in (1, 8) if b <= max(args.batches)]
        before = (linear._triton_gemv, linear._gemv_max_weight_bytes)
        variants = (("graphs+fused, cuBLAS (gemv off)", False, None),
                    ("graphs+fused, Triton GEMV <= 64 MiB (qkv, o)", True, 64 << 20),
                    ("graphs+fused, Triton GEMV all dense()", True, None))
        try:
            for label, on, limit in variants:
                linear.set_triton_gemv(on, limit)
                recapture(engine, fused=True)
                decode(batches, label)
                res["profiles"].append(profile_decode(engine, 1, args, label))
        finally:
            linear.set_triton_gemv(*before)
            recapture(engine, fused=True)

    def unfused():
        recapture(engine, fused=False)
        decode(args.batches, "graphs+unfused")
        for t in args.prefill:
            res["prefill"].append(measure_prefill(engine, t, ceil, "unfused"))

    named = {"fused_decode": fused_decode, "fused_prefill": fused_prefill,
             "profiles": profiles, "eager_decode": eager_decode, "attention": attention,
             "repeat": repeat, "rope_write_kv_ab": rope_write_kv_ab, "gemv_ab": gemv_ab,
             "hf": lambda: run_hf(engine, args, res), "eager_split_plan": eager_split_plan,
             "unfused": unfused}
    assert tuple(named) == SECTIONS
    skip = {"hf"} if args.skip_hf else set()
    if args.skip_unfused:
        skip |= {"eager_split_plan", "unfused"}
    if args.skip_rope_write_kv_ab:
        skip.add("rope_write_kv_ab")
    chosen = [n for n in SECTIONS if n not in skip
              and (args.sections is None or n in args.sections)]
    res["sections"] = chosen
    for section in (named[n] for n in chosen):
        try:
            section()
        except Exception:  # keep measuring; the error is part of the report
            err = traceback.format_exc()
            print(err, flush=True)
            res["errors"].append(err[-2000:])
            for rid in list(engine._seqs):  # leave no half-measured requests behind
                engine.abort(rid)
        with open(args.out, "w") as f:  # after every section: a killed run keeps its figures
            json.dump(res, f, indent=1, default=str)
    text = report(res)
    res["markdown"] = text
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(text)
    return res


def run_hf(engine, args, res: dict) -> None:
    from pdserve.engine.loader.hf_export import hf_model_like

    hf = hf_model_like(engine.model, engine.model_config)
    res["hf_correctness"] = hf_correctness(engine, hf)
    print("hf correctness", res["hf_correctness"], flush=True)
    res["hf_decode"] = []
    for b in args.hf_batches:
        row = hf_decode(hf, b, args.context, engine.model_config.vocab_size, steps=10)
        res["hf_decode"].append(row)
        print("hf", row, flush=True)
        for r in res["decode"]:
            if r["batch"] == b and r["variant"] == "graphs+fused":
                r["hf_ms"] = row["step_ms"]
                r["speedup_vs_hf"] = row["step_ms"] / r["step_ms"]
        gc.collect()
        torch.cuda.empty_cache()
    del hf
    gc.collect()
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
