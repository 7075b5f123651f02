"""Back-pressure: a decode pool too small for every request at once queues requests in the
router instead of failing them, and every one still gets the tokens it would get alone."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.cluster_checks import assert_blocks_back, collect, running_cluster

pytestmark = pytest.mark.slow

# SmolLM2 fp32 blocks of 16 tokens take 0.7 MiB: 8 MiB is 11 blocks (176 tokens), so only
# one or two of these requests (up to 6 blocks each) fit on the decode worker at a time.
CONFIG = {
    "kv": {"memory_mb": 8},
    "prefill": {"num_cpus": 0.5, "threads": 1},
    "decode": {"num_cpus": 0.5, "threads": 1},
    "router": {"admission_timeout": 120},
}


def test_full_decode_pool_queues_requests_instead_of_failing():
    rng = random.Random(7)
    prompts = [[rng.randrange(100, 20000) for _ in range(rng.randrange(40, 70))]
               for _ in range(6)]
    with running_cluster(CONFIG) as (_, client):
        start = {"prefill-0": 11, "decode-0": 11}
        alone = [collect(client.stream(p, max_tokens=24, min_tokens=24, temperature=0.0))
                 for p in prompts]

        def run(p):
            return collect(client.stream(p, max_tokens=24, min_tokens=24, temperature=0.0))

        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(run, prompts))
        for a, t in zip(alone, together):
            assert t["finish_reason"] == "length"
            assert t["token_ids"] == a["token_ids"]
        assert client.stats().handoff_retries == 0
        assert_blocks_back(client, start)
