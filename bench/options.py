"""The ``python -m pdserve.bench`` argument parser and the checks that turn arguments into settings.

Every problem with the input is raised as ``UsageError`` (or ValueError / FileNotFoundError
from the parsers it calls) with a one-line message; ``cli.main`` prints it and exits 2.
"""

from __future__ import annotations

import argparse
import math
import os
import random
from pathlib import Path

from pdserve.bench.arrival import Arrival
from pdserve.bench.chat import chat_workload
from pdserve.bench.long_doc import long_doc_workload
from pdserve.bench.sharegpt import file_workload
from pdserve.bench.text_tokens import DEFAULT_TOKENIZER, NO_TOKENIZER, ChatTokens, load_tokenizer
from pdserve.bench.workloads import (
    Workload,
    cycle_to,
    parse_range,
    random_workload,
    shared_prefix_workload,
)

SAMPLE_DATASET = Path(__file__).parent / "data" / "sharegpt_sample.json"
DEFAULT_NUM_REQUESTS = 100
DEFAULT_OUTPUT_LEN = "16:64"
DEFAULT_NUM_USERS = 8


class UsageError(Exception):
    """Bad command-line input; the message is one line naming the problem."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse would print the usage block and exit; we want one line and exit code 2.
        raise UsageError(" ".join(message.split()))


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's argument parser."""
    p = _Parser(prog="python -m pdserve.bench",
                description="Benchmark a pdserve cluster over gRPC, or any OpenAI-compatible "
                "server (pdserve's HTTP API, vLLM, SGLang) over HTTP, with one client.")
    p.add_argument("--backend", default="pdserve", choices=("pdserve", "openai"),
                   help="pdserve: the gRPC API at --target; openai: the OpenAI HTTP API at "
                   "--base-url (streamed /v1/completions and /v1/chat/completions)")
    p.add_argument("--target", default="127.0.0.1:50051", help="pdserve backend: router "
                   "HOST:PORT")
    p.add_argument("--base-url", default=None, help="openai backend: server URL, e.g. "
                   "http://127.0.0.1:8000 (/v1 is added when missing)")
    p.add_argument("--model", default=None, help="openai backend: model to request "
                   "(default: the first one GET /v1/models lists)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("PDSERVE_API_KEY"),
        help="bearer token for the API (default: $PDSERVE_API_KEY)",
    )
    p.add_argument("--ca-file", default=None, help="TLS: verify the server's certificate "
                   "against this CA certificate (PEM); pdserve backend: connect with TLS "
                   "(an https:// --base-url uses TLS anyway, with the system's roots "
                   "unless this is given)")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", default="random",
                   choices=("random", "shared-prefix", "file", "chat", "long-doc"))
    w.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help="measured requests (default: 100; shared-prefix, chat, long-doc: the full "
        "pattern, which chat and long-doc size to this number when --num-users / "
        "--num-docs is not given)",
    )
    w.add_argument("--input-len", default="128:512", help="random: prompt tokens, N or LO:HI")
    w.add_argument(
        "--output-len", default=None, help="output tokens, N or LO:HI (default 16:64; chat: "
        "each dataset reply's length, clamped into LO:HI when given)"
    )
    w.add_argument("--vocab", default="1000:30000", help="token ids drawn from LO:HI (HI excl.)")
    w.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: system prompts")
    w.add_argument("--questions-per-prefix", type=int, default=8)
    w.add_argument("--prefix-len", default="1024", help="shared-prefix: system prompt tokens")
    w.add_argument("--question-len", default="16:64",
                   help="shared-prefix, long-doc: question tokens")
    w.add_argument("--num-chats", type=int, default=2, help="shared-prefix: multi-turn chats")
    w.add_argument("--turns", type=int, default=4, help="shared-prefix, chat: turns per chat")
    w.add_argument("--num-users", type=int, default=None,
                   help=f"chat: conversations (default {DEFAULT_NUM_USERS})")
    w.add_argument("--system-len", type=int, default=1024,
                   help="chat: tokens of each shared system prompt (0: none)")
    w.add_argument("--num-system-prompts", type=int, default=2,
                   help="chat: distinct system prompts, shared round robin by the users")
    w.add_argument("--num-docs", type=int, default=None, help="long-doc: documents (default 4)")
    w.add_argument("--doc-len", default="1536", help="long-doc: document tokens, N or LO:HI")
    w.add_argument("--questions-per-doc", type=int, default=4,
                   help="long-doc: questions per document")
    w.add_argument("--dataset", default=str(SAMPLE_DATASET),
                   help="file, chat, long-doc: ShareGPT JSON")
    w.add_argument(
        "--tokenizer", default=None,
        help="a tokenizer.json, or a model (embedded name, .gguf, HF directory) whose "
        "tokenizer and chat template to use. file: counts tokens (default: words x 1.3); "
        f"chat, long-doc: makes the token ids sent (default {DEFAULT_TOKENIZER}; "
        f"'{NO_TOKENIZER}': random ids from --vocab, lengths estimated)",
    )
    w.add_argument(
        "--max-len",
        type=int,
        default=2048,
        help="prompt + output limit. file: longer entries are skipped; chat: a chat ends "
        "before its first longer turn; long-doc: a longer prompt is an error",
    )
    w.add_argument(
        "--no-force-output-len",
        dest="force_output_len",
        action="store_false",
        help="let EOS end outputs early (default: min_tokens = max_tokens)",
    )
    w.add_argument("--temperature", type=float, default=0.0)
    a = p.add_argument_group("arrivals")
    paced = a.add_mutually_exclusive_group()
    paced.add_argument("--rate", type=float, help="Poisson arrivals, requests/s")
    paced.add_argument("--rates", help="rate sweep, e.g. 1,2,4,8")
    paced.add_argument("--all-at-once", action="store_true", help="send every request at t=0")
    a.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of inter-arrival gaps (1 = Poisson, <1 burstier)",
    )
    a.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="max requests in flight (alone: a closed loop of N clients)",
    )
    r = p.add_argument_group("run")
    r.add_argument("--warmup", type=int, default=2, help="warm-up requests, not measured")
    r.add_argument(
        "--time-limit", type=float, default=None, help="stop sending after this many seconds"
    )
    r.add_argument("--request-timeout", type=float, default=300.0)
    r.add_argument("--connect-timeout", type=float, default=5.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "--slo",
        default="",
        help="latency bounds every request must meet, e.g. ttft=500ms,tpot=50ms,e2e=2s "
        "(unit required). Computes SLO attainment = share of measured requests that "
        "completed within every bound (failed and aborted requests miss), and goodput = "
        "those requests per second of the measured window; with --rates, the goodput "
        "rate = the highest rate whose attainment is >= 90%% (DistServe). Without --slo "
        "every completed request counts",
    )
    r.add_argument(
        "--out-dir", default=None, help="JSON report and plots (default: bench/results/<time>)"
    )
    r.add_argument("--no-plots", dest="plots", action="store_false")
    r.add_argument("--no-progress", dest="progress", action="store_false")
    r.add_argument(
        "--compare",
        nargs="+",
        metavar="CONFIG",
        help="cluster YAML configs to start in turn and compare",
    )
    r.add_argument(
        "--serve-command",
        default=None,
        help="how --compare starts a config, {config} replaced "
        "(default: python -m pdserve.cluster serve {config})",
    )
    r.add_argument("--cluster-start-timeout", type=float, default=300.0)
    return p


def check_backend(args: argparse.Namespace) -> None:
    """The flags of the chosen backend are given and the other backend's are not."""
    if args.backend == "openai":
        if not args.base_url:
            raise UsageError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000)")
        if not args.base_url.startswith(("http://", "https://")):
            raise UsageError(f"--base-url must start with http:// or https://, got "
                             f"{args.base_url!r}")
        if args.compare:
            raise UsageError("--compare starts pdserve clusters and drives their gRPC API; "
                             "use --backend pdserve with it")
        return
    check_target(args.target)
    for flag, value in (("--base-url", args.base_url), ("--model", args.model)):
        if value is not None:
            raise UsageError(f"{flag} applies to --backend openai only")


def check_target(target: str) -> str:
    """HOST:PORT with a port in 1..65535, or UsageError."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--target must be HOST:PORT, got {target!r}")
    return target


def arrivals(args: argparse.Namespace) -> list[Arrival]:
    """One Arrival per run: several for a --rates sweep."""
    if args.rates is not None:
        try:
            rates = [float(x) for x in args.rates.split(",") if x.strip()]
        except ValueError:
            raise UsageError(
                f"--rates must be numbers separated by commas, got {args.rates!r}"
            ) from None
        if not rates:
            raise UsageError("--rates is empty")
    else:
        rates = [args.rate]
    if args.burstiness != 1.0 and rates == [None]:
        raise UsageError("--burstiness only applies with --rate or --rates")
    if args.concurrency is not None and args.all_at_once:
        raise UsageError("--all-at-once and --concurrency contradict each other")
    for rate in rates:
        if rate is not None and not rate > 0:
            raise UsageError(f"request rate must be > 0, got {rate:g}")
    return [Arrival(rate, args.burstiness, args.concurrency) for rate in rates]


def check_numbers(args: argparse.Namespace) -> None:
    """Counts and durations that must be positive (or non-negative) are."""
    positive = {
        "--num-requests": args.num_requests,
        "--num-prefixes": args.num_prefixes,
        "--questions-per-prefix": args.questions_per_prefix,
        "--turns": args.turns,
        "--time-limit": args.time_limit,
        "--request-timeout": args.request_timeout,
        "--connect-timeout": args.connect_timeout,
        "--max-len": args.max_len,
        "--num-users": args.num_users,
        "--num-system-prompts": args.num_system_prompts,
        "--num-docs": args.num_docs,
        "--questions-per-doc": args.questions_per_doc,
    }
    for flag, value in positive.items():
        if value is not None and not value > 0:
            raise UsageError(f"{flag} must be > 0, got {value:g}")
    non_negative = {
        "--warmup": args.warmup,
        "--num-chats": args.num_chats,
        "--system-len": args.system_len,
    }
    for flag, value in non_negative.items():
        if value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    for config in args.compare or ():
        if not Path(config).is_file():
            raise UsageError(f"cluster config not found: {config}")


def build_workload(args: argparse.Namespace, seed: int, count: int | None) -> Workload:
    """The workload the arguments describe, with ``count`` requests (None: the default)."""
    output_len = parse_range(args.output_len or DEFAULT_OUTPUT_LEN, "--output-len")
    vocab = parse_range(args.vocab, "--vocab")
    if args.workload in ("chat", "long-doc"):
        return text_workload(args, seed, count, vocab)
    if args.workload == "random":
        n = count or DEFAULT_NUM_REQUESTS
        return random_workload(
            n, parse_range(args.input_len, "--input-len"), output_len, seed, vocab
        )
    if args.workload == "shared-prefix":
        workload = shared_prefix_workload(
            args.num_prefixes,
            args.questions_per_prefix,
            parse_range(args.prefix_len, "--prefix-len"),
            parse_range(args.question_len, "--question-len"),
            output_len,
            args.num_chats,
            args.turns,
            seed,
            vocab,
        )
        if count and count != len(workload.requests):
            how = "repeated" if count > len(workload.requests) else "cut"
            workload.note += f"; pattern of {len(workload.requests)} {how} to {count} requests"
            workload.requests = cycle_to(workload.requests, count)
        return workload
    tokenizer = None if args.tokenizer == NO_TOKENIZER else args.tokenizer
    return file_workload(
        args.dataset, count or DEFAULT_NUM_REQUESTS, seed, tokenizer, args.max_len
    )


def text_workload(
    args: argparse.Namespace, seed: int, count: int | None, vocab: tuple[int, int]
) -> Workload:
    """``chat`` or ``long-doc``: a pattern of units (users, documents) x steps (turns,
    questions), sized to ``count`` when the number of units is not given, then cut to it."""
    spec = args.tokenizer or DEFAULT_TOKENIZER
    tokens = ChatTokens(
        None if spec == NO_TOKENIZER else load_tokenizer(spec), random.Random(seed), vocab
    )
    if args.workload == "chat":
        given, steps, default = args.num_users, args.turns, DEFAULT_NUM_USERS
        # Every system prompt needs a user, also in a warm-up of a request or two.
        least = args.num_system_prompts
    else:
        given, steps, default, least = args.num_docs, args.questions_per_doc, 4, 1
    units = given or (max(math.ceil(count / steps), least) if count else default)
    if args.workload == "chat":
        output_len = parse_range(args.output_len, "--output-len") if args.output_len else None
        workload = chat_workload(
            args.dataset, units, args.turns, args.system_len, args.num_system_prompts, seed,
            tokens, output_len, args.max_len,
        )
    else:
        workload = long_doc_workload(
            args.dataset, units, args.questions_per_doc,
            parse_range(args.doc_len, "--doc-len"),
            parse_range(args.question_len, "--question-len"),
            parse_range(args.output_len or DEFAULT_OUTPUT_LEN, "--output-len"),
            seed, tokens, args.max_len,
        )
    if count and count > len(workload.requests):
        flag = "--num-users" if args.workload == "chat" else "--num-docs"
        raise UsageError(
            f"{args.workload} makes {len(workload.requests)} requests, fewer than "
            f"--num-requests {count}; raise {flag} or leave it out"
        )
    if count and count < len(workload.requests):
        workload.note += f"; the first {count} of {len(workload.requests)} requests"
        workload.requests = workload.requests[:count]
    how = "the model's tokenizer " + spec if tokens.exact else "random ids, lengths estimated"
    workload.note += f"; token ids by {how}"
    return workload
