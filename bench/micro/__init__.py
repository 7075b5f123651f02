"""Microbenchmarks below the public API: the engine against HF transformers, GPU kernels,
the engine on a GPU, the NCCL KV handoff, and loads from the global KV store's CPU tier.

Unlike the load generator in `pdserve.bench` (which speaks only the public gRPC API and so
can measure any server), these import engine and transport internals. Each is a
`python -m pdserve.bench.micro.<name>` command; results and commands are in
`docs/benchmarks.md`.
"""
