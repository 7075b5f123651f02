"""The `nccl` KV transport over real NCCL: two GPUs, one process each (as Ray actors are).

(Named *_gpu so it does not clash with tests/unit/test_nccl_transport.py: the test folders
are not packages, so pytest needs distinct basenames.)

Each scenario spawns a prefill process on GPU 0 and a decode process on GPU 1; the decode
side drives it, handing sinks to the prefill side over a queue (announces go over the
receiver's loopback announce channel, as in a cluster), and both report what they saw.
Sources are bf16 random blocks regenerated from a seed on either side, so the decode side
checks the landed blocks bit for bit without shipping them back.
"""

from __future__ import annotations

import os
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from pdserve.engine.kv_cache.layout import KVLayout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

LAYERS, BLOCKS, BS, HEADS, DIM = 8, 160, 16, 8, 128
KEY = "gpu-test"
P_GPU, D_GPU = 0, 1


def _pool(gpu: int) -> torch.Tensor:
    return KVLayout(LAYERS, HEADS, DIM, BS, "bfloat16").allocate(BLOCKS, f"cuda:{gpu}")


def _source(gpu: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    shape = (LAYERS, 2, BLOCKS, BS, HEADS, DIM)
    return torch.randn(shape, generator=gen).to(torch.bfloat16).to(f"cuda:{gpu}")


def _sink(rx, rid: str, dst: list[int]) -> dict:
    return rx.expect(rid, dst, len(dst) * BS - 3, time.time() + 60).to_dict()


# ---- the prefill process ----------------------------------------------------------------------


def _prefill_main(uid_q, to_p, to_d, res_q) -> None:
    try:
        from pdserve.kv_transfer import KVSink, KVTransferError
        from pdserve.kv_transfer.nccl_transport import NcclKVSender

        torch.cuda.set_device(P_GPU)
        pool, src = _pool(P_GPU), _source(P_GPU)
        busy = torch.randn(4096, 4096, device=f"cuda:{P_GPU}", dtype=torch.bfloat16)
        (busy @ busy).clamp_(-1, 1)  # load these kernels before NCCL work is in flight
        pool.copy_(src)
        pool.zero_()
        torch.cuda.synchronize()
        tx = NcclKVSender(pool, KEY, timing=True)
        uid = tx.unique_id()
        uid_q.put(uid)
        tx.connect("decode-0", uid, 0)
        out: dict = {"send_layer_max_ms": 0.0}
        while True:
            cmd, items = to_p.get(timeout=120)
            if cmd == "stop":
                break
            # "stall" keeps its second sink to try after the pair broke
            todo = items[:1] if cmd == "stall" else items
            handles = [tx.open(KVSink.from_dict(s), ids) for s, ids in todo]
            if cmd == "compute":  # each layer written on the compute stream just before sending
                pool.zero_()
                torch.cuda.synchronize()
            else:
                pool.copy_(src)
            last = 2 if cmd in ("abort", "die", "stall") else LAYERS
            for layer in range(last):
                if cmd == "compute":
                    for _ in range(12):  # ~ms of matmuls: a send not ordered after them races
                        busy = (busy @ busy).clamp_(-1, 1)
                    pool[layer].copy_(src[layer])
                for h in handles:
                    t0 = time.perf_counter()
                    h.send_layer(layer)
                    out["send_layer_max_ms"] = max(out["send_layer_max_ms"],
                                                   (time.perf_counter() - t0) * 1e3)
            if cmd == "die":
                time.sleep(0.5)
                os._exit(0)  # the prefill worker dies mid-transfer
            if cmd == "abort":  # after the decode side accepted it: receives are posted
                deadline = time.monotonic() + 10
                while not handles[0].accepted and time.monotonic() < deadline:
                    time.sleep(0.001)
                handles[0].abort()
                continue
            if cmd == "stall":  # the decode side dies after layers 0-1: finish the rest
                to_d.put("sent-2")
                time.sleep(1.0)
                for layer in range(2, LAYERS):
                    handles[0].send_layer(layer)
                t0 = time.monotonic()
                try:
                    handles[0].finish(3.0)
                    out["finish"] = "returned"
                except Exception as e:  # noqa: BLE001 - reported, the test checks the type
                    out["finish"] = f"raised {type(e).__name__}: {e}"
                out["finish_s"] = time.monotonic() - t0
                out["broken"] = tx.broken_peers()
                try:
                    tx.open(KVSink.from_dict(items[1][0]), items[1][1])
                    out["open_after"] = "opened"
                except Exception as e:  # noqa: BLE001
                    out["open_after"] = f"raised {type(e).__name__}: {e}"
                break
            for h in handles:
                try:
                    h.finish(30)
                except KVTransferError as e:  # refused announces: reported, the test checks
                    out.setdefault("refused", []).append(f"{h.request_id}: {e}")
                out.setdefault("announce_ms", []).append((h.announce_s or 0) * 1e3)
                if h.data_s is not None:
                    out.setdefault("data_ms", []).append(h.data_s * 1e3)
        res_q.put(("prefill", out))
        tx.close()
    except BaseException:
        res_q.put(("prefill", {"error": traceback.format_exc()}))


# ---- the decode process -----------------------------------------------------------------------


def _decode_main(scenario: str, uid_q, to_p, to_d, res_q) -> None:
    # The hazard the announce protocol removes needs lazy module loading (CUDA's default):
    # make sure it is on, whatever the machine's environment says.
    os.environ["CUDA_MODULE_LOADING"] = "LAZY"
    try:
        from pdserve.kv_transfer import TransferStatus
        from pdserve.kv_transfer.nccl_transport import NcclKVReceiver

        torch.cuda.set_device(D_GPU)
        pool, src = _pool(D_GPU), _source(D_GPU)
        complete = TransferStatus.COMPLETE

        def landed(dst, ids) -> bool:
            return torch.equal(pool[:, :, dst], src[:, :, ids])

        # No warm-up of the checks' kernels: with the old always-posted header receive, their
        # first (lazily loaded) launch after connect hung until the next header arrived
        # (the 2026-11-22 run hung exactly so). Now nothing is posted while idle.
        rx = NcclKVReceiver(pool, KEY, name="decode-0", timing=True)
        rx.connect("prefill-0", uid_q.get(timeout=120), 1)

        out: dict = {}
        if scenario == "main":
            t0 = time.monotonic()  # idle pair, kernels never loaded in this process
            int(pool[:, :, [2, 3]].count_nonzero())
            torch.cuda.synchronize()
            out["fresh_kernel_idle_s"] = time.monotonic() - t0
            dst, ids = [40, 3, 4, 5, 17], [9, 10, 30, 31, 2]  # scattered on both sides
            to_p.put(("send", [(_sink(rx, "r1", dst), ids)]))
            out["scattered"] = rx.wait("r1", 30) is complete and landed(dst, ids) and \
                int(pool[:, :, [b for b in range(BLOCKS) if b not in dst]].count_nonzero()) == 0
            out["rx_data_s"] = rx.data_seconds("r1")
            reqs = [("c0", [50, 51, 52, 53], [0, 1, 2, 3]), ("c1", [60, 61], [20, 7]),
                    ("c2", [12, 13, 14], [33, 34, 35])]
            to_p.put(("compute", [(_sink(rx, r, d), i) for r, d, i in reqs]))
            out["concurrent_after_compute"] = all(
                rx.wait(r, 30) is complete and landed(d, i) for r, d, i in reqs)
            gone = _sink(rx, "gone", [20, 21])
            rx.cancel("gone")
            to_p.put(("send", [(gone, [1, 2])]))
            to_p.put(("send", [(_sink(rx, "after", [22]), [5])]))
            out["cancel_drained"] = rx.wait("after", 30) is complete and landed([22], [5]) and \
                int(pool[:, :, [20, 21]].count_nonzero()) == 0 and \
                rx.status("gone") is TransferStatus.UNKNOWN
            to_p.put(("abort", [(_sink(rx, "ab", [24, 25]), [6, 7])]))
            state = rx.wait("ab", 30)
            out["abort_failed"] = (state.name, rx.error("ab"))
            to_p.put(("send", [(_sink(rx, "ok", [26]), [8])]))
            out["pair_ok_after_abort"] = rx.wait("ok", 30) is complete and landed([26], [8])
            t0 = time.monotonic()  # idle again: a kernel first used now must not stall
            x = torch.linspace(0, 1, 4096, device=f"cuda:{D_GPU}")
            float(torch.special.i1e(x).sort().values.cumsum(0)[-1])
            out["fresh_kernel_after_transfers_s"] = time.monotonic() - t0
            to_p.put(("stop", []))
        elif scenario == "sender_dies":
            to_p.put(("die", [(_sink(rx, "r", list(range(128))), list(range(16, 144)))]))
            t0 = time.monotonic()
            out["wait"] = rx.wait("r", 3.0).name
            out["wait_s"] = time.monotonic() - t0
            t0 = time.monotonic()
            rx.cancel("r")  # what the decode worker does before freeing the blocks
            out["cancel_s"] = time.monotonic() - t0
            deadline = time.monotonic() + 10
            while not rx.broken_peers() and time.monotonic() < deadline:
                time.sleep(0.05)
            out["broken"] = rx.broken_peers()
        elif scenario == "receiver_dies":
            items = [(_sink(rx, "r", list(range(128))), list(range(16, 144))),
                     (_sink(rx, "r2", [150]), [151])]
            to_p.put(("stall", items))
            to_d.get(timeout=60)
            time.sleep(0.3)
            os._exit(0)  # the decode worker dies mid-transfer
        res_q.put(("decode", out))
        rx.close()
    except BaseException:
        res_q.put(("decode", {"error": traceback.format_exc()}))


def _run(scenario: str, expect: tuple[str, ...], timeout: float = 150.0) -> dict:
    ctx = mp.get_context("spawn")
    uid_q, to_p, to_d, res_q = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_prefill_main, args=(uid_q, to_p, to_d, res_q)),
             ctx.Process(target=_decode_main, args=(scenario, uid_q, to_p, to_d, res_q))]
    for p in procs:
        p.start()
    results: dict = {}
    deadline = time.monotonic() + timeout
    try:
        failed = False  # one side's error leaves the other waiting: stop at once
        while not failed and not set(expect) <= set(results) and time.monotonic() < deadline:
            try:
                role, payload = res_q.get(timeout=1.0)
            except Exception:  # noqa: BLE001 - queue.Empty: keep waiting
                continue
            results[role] = payload
            failed = "error" in payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for payload in results.values():
        assert "error" not in payload, payload["error"]
    for role in expect:
        assert role in results, f"{scenario}: no report from {role} in {timeout} s: {results}"
    print(scenario, results)
    return results


@pytest.fixture(scope="module")
def main_run() -> dict:
    return _run("main", ("prefill", "decode"))


def test_scattered_blocks_land_bit_for_bit(main_run):
    assert main_run["decode"]["scattered"]


def test_concurrent_requests_in_order_and_ordered_after_compute(main_run):
    assert main_run["decode"]["concurrent_after_compute"]
    # send_layer only records an event and enqueues: it must not wait for the wire
    assert main_run["prefill"]["send_layer_max_ms"] < 50


def test_cancelled_request_is_refused_on_the_host_and_the_pair_stays_in_step(main_run):
    assert main_run["decode"]["cancel_drained"]
    refused = main_run["prefill"].get("refused", [])
    assert len(refused) == 1 and refused[0].startswith("gone:") and "NOT_FOUND" in refused[0]


def test_idle_decode_gpu_launches_new_kernels_without_stalling(main_run):
    # With a receive always posted, these first launches waited for the next transfer.
    assert main_run["decode"]["fresh_kernel_idle_s"] < 5.0
    assert main_run["decode"]["fresh_kernel_after_transfers_s"] < 5.0


def test_timing_option_reports_the_data_path_on_both_streams(main_run):
    assert main_run["decode"]["rx_data_s"] is not None and main_run["decode"]["rx_data_s"] > 0
    assert main_run["prefill"]["data_ms"] and min(main_run["prefill"]["data_ms"]) > 0


def test_sender_abort_fails_the_request_and_keeps_the_pair(main_run):
    state, error = main_run["decode"]["abort_failed"]
    assert state == "FAILED" and "aborted" in error
    assert main_run["decode"]["pair_ok_after_abort"]


def test_sender_death_fails_wait_within_the_timeout():
    out = _run("sender_dies", ("decode",))["decode"]
    assert out["wait"] == "FAILED" and out["wait_s"] < 4.0
    assert out["cancel_s"] < 6.0  # blocks can be freed: no NCCL write can land any more
    assert out["broken"] == ["prefill-0"]


def test_receiver_death_fails_finish_within_the_timeout():
    out = _run("receiver_dies", ("prefill",))["prefill"]
    assert out["finish"].startswith("raised KVTransferError") and out["finish_s"] < 4.0, out
    assert out["broken"] == ["decode-0"]
    assert out["open_after"].startswith("raised KVTransferError"), out
    assert "broken" in out["open_after"]
