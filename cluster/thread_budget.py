"""How many compute threads each worker rank of a cluster gets (`threads: auto`).

Every rank runs its own OpenMP pool. More threads than free cores make each matmul wait at
its barrier for a thread the OS has descheduled, so the ranks on one machine must not ask
for more threads, together, than it has cores; and decode, whose steps every streaming
request waits on, must never be the side left short.

The rule, for a cluster whose workers all run on this machine (a locally started Ray):

1. pools with an explicit `threads` keep it, and their ranks' threads come off the cores;
2. the cores left are split evenly over the ranks of the `auto` pools, at least 1 each;
3. what the even split leaves over goes to the decode ranks.

So 2 cores, 1P1D: 1 + 1; 8 cores, 1P1D: 4 + 4; 3 cores, 1P1D: prefill 1, decode 2;
2 cores, 2 colocated workers: 1 each; 2 cores, 1 colocated worker: 2. In a joined cluster
the launcher cannot know which workers will share a node, so an `auto` rank takes the
whole Ray CPUs it reserves (`PoolSection.rank_threads`): size `num_cpus` for it.
"""

from __future__ import annotations

import os

from pdserve.cluster.config import ClusterConfig, PoolSection


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _ranks(cfg: ClusterConfig) -> dict[str, tuple[PoolSection, int]]:
    pools = {"decode": (cfg.decode, cfg.decode.count * cfg.decode.tp * cfg.decode.pp)}
    if cfg.mode == "disaggregated":
        pools["prefill"] = (cfg.prefill, cfg.prefill.count * cfg.prefill.tp * cfg.prefill.pp)
    return pools


def local_thread_budget(cfg: ClusterConfig, cores: int) -> dict[str, int]:
    """Threads per rank of each pool ("prefill" only when disaggregated) when every rank
    runs on a machine of `cores` cores (the rule in the module docstring)."""
    pools = _ranks(cfg)
    fixed = {name: p.threads for name, (p, _) in pools.items() if p.threads != "auto"}
    auto = {name: n for name, (p, n) in pools.items() if p.threads == "auto" and n > 0}
    free = cores - sum(fixed[name] * pools[name][1] for name in fixed)
    out = dict(fixed)
    total = sum(auto.values())
    if not total:
        return out | {name: 1 for name in pools if name not in out}
    each = max(1, free // total)
    out |= {name: each for name in auto}
    left = free - each * total
    if "decode" in auto and left >= auto["decode"]:
        out["decode"] += left // auto["decode"]
    return out | {name: 1 for name in pools if name not in out}  # pools of no ranks


def with_thread_budget(cfg: ClusterConfig, local: bool, cores: int | None = None
                       ) -> ClusterConfig:
    """`cfg` with every pool's `threads` a number: the local split (`local`: every worker
    on this machine, of `cores` cores, default this process's), else each rank's whole
    Ray CPUs. Explicit numbers are kept."""
    if local:
        budget = local_thread_budget(cfg, cores or machine_cores())
    else:
        budget = {name: p.rank_threads() for name, (p, _) in _ranks(cfg).items()}
    update = {name: getattr(cfg, name).model_copy(update={"threads": n})
              for name, n in budget.items()}
    if "prefill" not in update:  # colocated: the prefill pool runs no worker
        update["prefill"] = cfg.prefill.model_copy(update={"threads": cfg.prefill.rank_threads()})
    return cfg.model_copy(update=update)
