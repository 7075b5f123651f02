"""Executors: how a worker runs one model step (DESIGN.md, "The seams").

- `base`: the `Executor` ABC and its invariants; `ExecutorError`.
- `step`: `StepInput` / `StepOutput`, what crosses from the driver to every rank and back.
- `rank_worker`: one rank's model shard, KV pool and runner.
- `uniproc`: `UniprocExecutor`, the whole model in this process (the default).
- `group`: a rank group's process groups and its driver -> follower control channel.
- `multiproc`: `MultiprocExecutor` (the driver rank of a tensor-parallel group) and
  `run_follower` (what every other rank runs: execute, never schedule).

Nothing is imported here, so that the model runner can import `step` without pulling in
the executors that build model runners.
"""
