"""The `pdserve` command: serve a cluster, stream a completion, benchmark, show stats and
status, stop a server, or run the whole disaggregated path once (`pdserve demo`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "local.yaml")


def _serve(args) -> int:
    from pdserve.cluster.config import ConfigError, load_config, parse_config
    from pdserve.cluster.launcher import serve

    try:
        cfg = load_config(args.config) if args.config else parse_config({})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port),
                                   ("http_host", args.http_host), ("http_port", args.http_port))
                 if v is not None}
    if overrides:  # validated like the YAML: --http-port 70000 is refused the same way
        raw = cfg.model_dump(mode="json")
        raw["router"].update(overrides)
        try:
            cfg = parse_config(raw, "the config with the command line's options")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        return serve(cfg)
    except OSError as e:  # a port already in use: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before serving; everything it started was stopped
        print("interrupted during start-up", file=sys.stderr)
        return 130


def _demo(args) -> int:
    from pdserve.cluster.config import ConfigError, load_config
    from pdserve.cluster.demo import run_demo

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_demo(cfg, args.prompt, max_tokens=args.max_tokens)


def _generate(args) -> int:
    import grpc

    from pdserve.cluster.client import PdserveClient

    token = os.environ.get(args.token_env) if args.token_env else None
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        sampling["seed"] = args.seed
    try:
        with PdserveClient(args.target, token=token, ca_file=args.ca_file) as client:
            last = None
            for r in client.stream(prompt, **sampling):
                print(r.text, end="", flush=True)
                last = r
            print()
            if last is not None and args.verbose:
                u = last.usage
                print(f"[{last.finish_reason}; prompt {u.prompt_tokens} tokens, completion "
                      f"{u.completion_tokens}, cached {u.cached_tokens}]", file=sys.stderr)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2 if e.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    return 0


def _stats(args) -> int:
    import grpc

    from pdserve.cluster.client import PdserveClient
    from pdserve.cluster.control import format_store_pools

    try:
        with PdserveClient(args.target, ca_file=args.ca_file) as client:
            s = client.stats()
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(f"{'worker':<14}{'role':<11}{'free/total blocks':>18}{'running':>9}{'waiting':>9}"
          f"  {'ranks':<12}")
    for w in s.workers:
        if w.state == "down":
            print(f"{w.worker_id:<14}{w.role:<11}{'DOWN':>18}  (dead or hung; being replaced)")
            continue
        ranks = f"tp{w.tp or 1} pp{w.pp or 1} " + ("FAILED" if w.rank_failure else "ok")
        print(f"{w.worker_id:<14}{w.role:<11}{w.free_blocks:>9}/{w.total_blocks:<8}"
              f"{w.running:>9}{w.waiting:>9}  {ranks:<12}")
        if w.rank_failure:
            print(f"  {w.worker_id}: {w.rank_failure}")
    print(f"finished {s.requests_finished}, aborted {s.requests_aborted}, "
          f"handoff retries {s.handoff_retries}, in flight {s.queued_requests}, "
          f"migrated {s.migrations}, workers replaced {s.workers_replaced}, "
          f"routing {s.routing_policy or '?'}")
    for line in format_store_pools(s.kv_store):
        print(line)
    return 0


def _target(args) -> str:
    """--target, else the only local server's gRPC address, else the default port."""
    if args.target:
        return args.target
    from pdserve.cluster.control import running_servers

    servers = running_servers()
    return servers[0]["grpc"] if len(servers) == 1 else "127.0.0.1:50051"


def _status(args) -> int:
    import grpc

    from pdserve.cluster.client import PdserveClient
    from pdserve.cluster.control import format_status
    from pdserve.proto import pb

    target = _target(args)
    token = os.environ.get(args.token_env) if args.token_env else None
    with PdserveClient(target, token=token, ca_file=args.ca_file) as client:
        try:
            health = client.health()
            models = client.generation.ListModels(pb.ListModelsRequest(), timeout=30,
                                                  metadata=client.metadata).models
        except grpc.RpcError as e:
            print(f"error: router {target}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        try:
            stats = client.stats()
        except grpc.RpcError as e:
            print(format_status(target, health, models[0] if models else None, None))
            print(f"error: worker stats failed (a worker is down?): {e.details()}",
                  file=sys.stderr)
            return 1
    print(format_status(target, health, models[0] if models else None, stats))
    return 0


def _stop(args) -> int:
    from pdserve.cluster.control import stop_server

    try:
        server = stop_server(args.target, args.timeout)
    except (LookupError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"stopped pdserve (pid {server['pid']}, gRPC {server['grpc']}"
          + (f", HTTP {server['http']}" if server.get("http") else "") + ")")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from pdserve.bench.cli import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve", help="start a cluster from a YAML config and serve gRPC")
    p.add_argument("config", nargs="?", default=None,
                   help="cluster YAML (default: built-in local CPU 1P1D config)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None, help="gRPC port")
    p.add_argument("--http-host", default=None, help="OpenAI HTTP API interface")
    p.add_argument("--http-port", type=int, default=None, help="OpenAI HTTP API port")
    d = sub.add_parser("demo", help="start a local cluster, stream one answer through the "
                       "router, say what happened, shut down")
    d.add_argument("prompt", nargs="?", default="Why is the sky blue?")
    d.add_argument("--config", default=DEFAULT_CONFIG, help="cluster YAML (default: %(default)s)")
    d.add_argument("--max-tokens", type=int, default=64)
    g = sub.add_parser("generate", help="stream a completion from a running cluster")
    g.add_argument("prompt")
    g.add_argument("--target", default="127.0.0.1:50051")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="send as a chat message (template)")
    g.add_argument("--token-env", default=None, help="env var holding the bearer token")
    g.add_argument("-v", "--verbose", action="store_true")
    s = sub.add_parser("stats", help="per-worker KV blocks and queues")
    s.add_argument("--target", default="127.0.0.1:50051")
    st = sub.add_parser("status", help="router health, model, workers and their KV use")
    st.add_argument("--target", default=None,
                    help="router HOST:PORT (default: the one local server, or :50051)")
    st.add_argument("--token-env", default=None, help="env var holding the bearer token")
    for q in (g, s, st):
        q.add_argument("--ca-file", default=None, help="connect with TLS, verifying the "
                       "router's certificate against this CA certificate (PEM)")
    sp = sub.add_parser("stop", help="stop a `pdserve serve` running on this machine")
    sp.add_argument("--target", default=None, help="its gRPC HOST:PORT (needed when several "
                    "run here)")
    sp.add_argument("--timeout", type=float, default=60.0)
    sub.add_parser("bench", help="serving benchmark (see `pdserve bench --help`)")
    args = parser.parse_args(argv)
    if args.cmd == "demo":  # the demo's own lines carry the story; Ray's and ours stay quiet
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return {"serve": _serve, "generate": _generate, "stats": _stats, "status": _status,
            "stop": _stop, "demo": _demo}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
