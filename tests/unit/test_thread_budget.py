"""Compute threads per worker rank (`threads: auto`) and the process settings a worker
starts with (passive OpenMP waiting, its thread count), checked in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.cluster.config import ConfigError, parse_config
from pdserve.cluster.thread_budget import local_thread_budget, with_thread_budget
from pdserve.engine.cpu_threads import worker_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("raw, cores, expect", [
    ({}, 2, {"prefill": 1, "decode": 1}),
    ({}, 3, {"prefill": 1, "decode": 2}),  # the odd core goes to decode
    ({}, 8, {"prefill": 4, "decode": 4}),
    ({}, 1, {"prefill": 1, "decode": 1}),  # never 0, even oversubscribed
    ({"mode": "colocated", "decode": {"count": 2}}, 2, {"decode": 1}),
    ({"mode": "colocated", "decode": {"count": 1}}, 2, {"decode": 2}),
    ({"decode": {"count": 2}}, 5, {"prefill": 1, "decode": 2}),
    ({"prefill": {"threads": 4}}, 6, {"prefill": 4, "decode": 2}),  # explicit comes off first
    ({"prefill": {"threads": 2}, "decode": {"threads": 3}}, 2, {"prefill": 2, "decode": 3}),
    ({"decode": {"tp": 3}}, 8, {"prefill": 2, "decode": 2}),  # per rank
])
def test_local_budget_splits_the_cores_decode_first(raw, cores, expect):
    assert local_thread_budget(parse_config(raw), cores) == expect


def test_budgeted_config_carries_numbers_to_every_worker():
    cfg = with_thread_budget(parse_config({"decode": {"threads": 3}}), local=True, cores=4)
    blob = cfg.model_dump(mode="json")  # what the launcher hands each rank
    assert (blob["prefill"]["threads"], blob["decode"]["threads"]) == (1, 3)
    assert parse_config(blob) == cfg  # and it still validates


def test_joined_cluster_gives_each_rank_its_ray_cpus():
    cfg = parse_config({"prefill": {"num_cpus": 4}, "decode": {"num_cpus": 0.5}})
    out = with_thread_budget(cfg, local=False)
    assert (out.prefill.threads, out.decode.threads) == (4, 1)
    assert out.engine_config(out.prefill).num_threads == 4


def test_bad_threads_are_refused_naming_the_field():
    for bad in (0, -1, "many"):
        with pytest.raises(ConfigError, match="decode"):
            parse_config({"decode": {"threads": bad}})


def test_worker_env_is_passive_and_refuses_zero():
    assert worker_env(3) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3",
                             "OMP_WAIT_POLICY": "PASSIVE"}
    with pytest.raises(ValueError, match="threads"):
        worker_env(0)


def _fresh_process(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, check=True,
                          env=base | {"PYTHONPATH": str(ROOT), "OMP_DISPLAY_ENV": "VERBOSE"} | env)


def test_configure_process_reaches_openmp_before_torch_loads():
    """OpenMP prints the settings it loaded with (OMP_DISPLAY_ENV): passive waiting, i.e.
    no spinning at barriers (libgomp shows 'PASSIVE' for an unset policy too, so the spin
    count is what tells them apart), and torch runs the configured number of threads."""
    out = _fresh_process(
        "from pdserve.engine.cpu_threads import configure_process\n"
        "configure_process(1)\n"
        "import torch\n"
        "print('threads', torch.get_num_threads(), torch.get_num_interop_threads())\n")
    assert "GOMP_SPINCOUNT = '0'" in out.stdout + out.stderr
    assert "threads 1 1" in out.stdout


def test_configure_process_keeps_a_wait_policy_the_user_set():
    out = _fresh_process(
        "from pdserve.engine.cpu_threads import configure_process\n"
        "configure_process(1)\n", OMP_WAIT_POLICY="ACTIVE")
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in out.stdout + out.stderr


def test_configure_process_after_torch_says_the_policy_did_not_apply():
    out = _fresh_process(
        "import logging, torch\n"
        "logging.basicConfig()\n"
        "from pdserve.engine.cpu_threads import configure_process\n"
        "configure_process(1)\n"
        "print('threads', torch.get_num_threads())\n")
    assert "GOMP_SPINCOUNT = '300000'" in out.stdout + out.stderr  # the default spin
    assert "keeps the wait policy it loaded with" in out.stderr
    assert "threads 1" in out.stdout
