"""Prometheus metrics of the router, served at `/metrics` of the HTTP front end.

Names, units and buckets follow vLLM's (`vllm:x` is `pdserve:x` here), so a vLLM dashboard
maps with a rename. Two sources, and no per-token RPC:

- per request, measured in the router as chunks pass through `FrontDoor.run` (gRPC and
  HTTP alike): TTFT, inter-token latency, per-request TPOT, end-to-end latency, token
  counts, prefix-cache hits (from the final chunk's usage), finish reasons, rejections;
- per worker, from the stats the router already polls every 0.5 s
  (`observe_worker_stats`): running / waiting requests, KV blocks free and in use, tokens
  processed, KV handoffs (count, bytes, seconds), expired leases. These are read at scrape
  time from the latest poll, so they are at most one poll interval old;
- per node pool of the global KV store, refreshed every 5 s (`observe_store_pools`):
  capacity, blocks indexed and pinned, evictions, puts (labels `node`, `tier`).

Every metric carries the `model_name` label; worker metrics add `worker` and `role`.
Inter-token latency has exactly one sample per generated token after the first: a chunk
carrying k tokens a gap g after the previous token gives k samples of g/k, and tokens that
arrive together with the first token give samples of 0.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from pdserve.messages import StorePoolStats, WorkerStats
from pdserve.router.frontdoor import Admitted, ChunkFields, Refusal
from pdserve.router.lifecycle import RouterCounters

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class RouterMetrics:
    """The router's metrics in a private registry (one per router, so several routers in
    one process, as in tests, never share or clash)."""

    def __init__(self, model_name: str, max_model_len: int, counters: RouterCounters,
                 clock=time.perf_counter):
        self.model_name = model_name
        self.clock = clock
        self.registry = CollectorRegistry()
        r, lab = self.registry, ["model_name"]
        tokens = buckets_1_2_5(max_model_len)

        def hist(name, doc, buckets):
            return Histogram(name, doc, lab, buckets=buckets, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, lab, registry=r).labels(model_name)

        self.ttft = hist("pdserve:time_to_first_token_seconds",
                         "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = hist("pdserve:inter_token_latency_seconds",
                        "Histogram of inter-token latency in seconds.", TPOT_BUCKETS)
        self.tpot = hist("pdserve:request_time_per_output_token_seconds",
                         "Histogram of time per output token in seconds, per request.",
                         TPOT_BUCKETS)
        self.e2e = hist("pdserve:e2e_request_latency_seconds",
                        "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS)
        self.decode_time = hist("pdserve:request_decode_time_seconds",
                                "Histogram of time from first to last token in seconds.",
                                REQUEST_LATENCY_BUCKETS)
        self.prompt_hist = hist("pdserve:request_prompt_tokens",
                                "Number of prefill tokens processed.", tokens)
        self.generation_hist = hist("pdserve:request_generation_tokens",
                                    "Number of generation tokens processed.", tokens)
        self.max_tokens_hist = hist("pdserve:request_params_max_tokens",
                                    "Histogram of the max_tokens request parameter.", tokens)
        self.prompt_tokens = counter("pdserve:prompt_tokens", "Number of prefill tokens "
                                     "processed (counted when the first token returns).")
        self.generation_tokens = counter("pdserve:generation_tokens",
                                         "Number of generation tokens processed.")
        self.prefix_queries = counter("pdserve:prefix_cache_queries", "Prefix cache queries, "
                                      "in terms of number of queried tokens.")
        self.prefix_hits = counter("pdserve:prefix_cache_hits", "Prefix cache hits, in terms "
                                   "of number of cached tokens.")
        self._success = Counter("pdserve:request_success", "Count of finished requests by "
                                "finish reason (stop, length, abort, error).",
                                [*lab, "finished_reason"], registry=r)
        self._rejections = Counter("pdserve:request_rejections", "Requests refused for lack "
                                   "of room (queue_full: router.max_queue in flight; "
                                   "decode_full: no KV blocks within the admission timeout).",
                                   [*lab, "reason"], registry=r)
        # Exported as 0 from the start, so rates and dashboards see every series at once.
        for reason in ("stop", "length", "abort", "error"):
            self._success.labels(model_name, reason)
        for reason in ("queue_full", "decode_full"):
            self._rejections.labels(model_name, reason)
        self._polled = _PolledCollector(model_name, counters)
        r.register(self._polled)
        Gauge("pdserve:router_requests_in_flight", "Requests admitted by the router and not "
              "yet finished.", lab, registry=r).labels(model_name).set_function(
                  lambda: counters.in_flight)

    def watch(self, admitted: Admitted) -> RequestWatch:
        """Start timing one request (from admission)."""
        return RequestWatch(self, admitted)

    def on_rejected(self, refusal: Refusal) -> None:
        self._rejections.labels(self.model_name, refusal.value).inc()

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def observe_worker_stats(self, stats: list[WorkerStats]) -> None:
        """The latest poll of every worker's stats (what `WorkerClient.stats` returns)."""
        self._polled.snapshot = list(stats)
        self._polled.polled_at = time.monotonic()

    def observe_store_pools(self, pools: list[StorePoolStats]) -> None:
        """The latest figures of the global KV store's node pools."""
        self._polled.store_pools = list(pools)

    def stats_age(self) -> float | None:
        """Seconds since the last successful worker stats poll; None before the first."""
        at = self._polled.polled_at
        return None if at is None else time.monotonic() - at

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class RequestWatch:
    """Timestamps of one request's chunks, turned into observations as they arrive."""

    def __init__(self, metrics: RouterMetrics, admitted: Admitted):
        self.m = metrics
        self.start = metrics.clock()
        self.prompt_len = len(admitted.prompt_ids)
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.finished = False
        metrics.max_tokens_hist.observe(admitted.params.max_tokens)

    def on_chunk(self, c: ChunkFields) -> None:
        now, k, m = self.m.clock(), len(c.token_ids), self.m
        if k:
            if self.first is None:
                self.first = now
                m.ttft.observe(now - self.start)
                m.prompt_tokens.inc(self.prompt_len)
                for _ in range(k - 1):
                    m.itl.observe(0.0)
            else:
                for _ in range(k):
                    m.itl.observe((now - self.last) / k)
            self.last = now
            self.tokens += k
            m.generation_tokens.inc(k)
        if c.finished and not self.finished:
            self.finished = True
            m.finished(c.finish_reason or "stop")
            m.e2e.observe(now - self.start)
            m.prompt_hist.observe(c.prompt_tokens or self.prompt_len)
            m.generation_hist.observe(self.tokens)
            m.prefix_queries.inc(c.prompt_tokens or self.prompt_len)
            m.prefix_hits.inc(c.cached_tokens)
            if self.first is not None:
                m.decode_time.observe(self.last - self.first)
            if self.tokens > 1:
                m.tpot.observe((self.last - self.first) / (self.tokens - 1))

    def close(self, failed: bool) -> None:
        """The request's stream ended: a request that never finished was aborted (client
        gone) or failed (a worker or handoff error)."""
        if not self.finished:
            self.finished = True
            self.m.finished("error" if failed else "abort")


class _PolledCollector:
    """Worker figures from the latest stats poll, produced at scrape time."""

    def __init__(self, model_name: str, counters: RouterCounters):
        self.model_name = model_name
        self.counters = counters
        self.snapshot: list[WorkerStats] = []
        self.polled_at: float | None = None
        self.store_pools: list[StorePoolStats] = []

    def _store_families(self):
        """The global KV store's node pools (refreshed every few seconds by the launcher;
        a pool whose figures are unknown, its index or store process down, is left out)."""
        lab = ["model_name", "node", "tier"]
        gauges = [("capacity_blocks", "KV blocks a node's store pool holds."),
                  ("used_blocks", "KV blocks indexed in a node's store pool."),
                  ("pinned_blocks", "Store pool blocks being read now.")]
        counters = [("evictions", "Store pool blocks evicted to make room."),
                    ("puts", "Blocks saved into a node's store pool.")]
        fams = [(GaugeMetricFamily(f"pdserve:kv_store_{k}", doc, labels=lab), k)
                for k, doc in gauges]
        fams += [(CounterMetricFamily(f"pdserve:kv_store_{k}", doc, labels=lab), k)
                 for k, doc in counters]
        for p in self.store_pools:
            if p.indexed:
                for fam, k in fams:
                    fam.add_metric([self.model_name, p.node, p.tier], getattr(p, k))
        for fam, _ in fams:
            yield fam

    def describe(self):
        return []  # families depend on the workers; nothing to check at registration

    def collect(self):
        lab = ["model_name", "worker", "role"]
        fams = {
            "running": GaugeMetricFamily("pdserve:num_requests_running",
                                         "Requests in a worker's running batch.", labels=lab),
            "waiting": GaugeMetricFamily("pdserve:num_requests_waiting", "Requests waiting on "
                                         "a worker (decode: including uncommitted "
                                         "reservations).", labels=lab),
            "usage": GaugeMetricFamily("pdserve:kv_cache_usage_perc",
                                       "KV-cache usage. 1 means 100 percent usage.", labels=lab),
            "free_blocks": GaugeMetricFamily("pdserve:kv_cache_free_blocks",
                                             "Free KV blocks of a worker.", labels=lab),
            "total_blocks": GaugeMetricFamily("pdserve:kv_cache_total_blocks",
                                              "KV blocks of a worker.", labels=lab),
            "prompt_tokens": CounterMetricFamily("pdserve:worker_prompt_tokens",
                                                 "Prompt tokens a worker computed.", labels=lab),
            "generated_tokens": CounterMetricFamily("pdserve:worker_generation_tokens",
                                                    "Tokens a worker sampled.", labels=lab),
            "handoffs": CounterMetricFamily("pdserve:kv_handoffs", "KV handoffs a prefill "
                                            "worker completed.", labels=lab),
            "handoff_bytes": CounterMetricFamily("pdserve:kv_handoff_bytes",
                                                 "KV bytes handed off.", labels=lab),
            "handoff_seconds": SummaryMetricFamily(
                "pdserve:kv_handoff_seconds", "KV handoff latency, transfer open to "
                "acknowledgement (count and sum).", labels=lab),
            "handoff_tail_seconds": SummaryMetricFamily(
                "pdserve:kv_handoff_tail_seconds", "First token sampled to handoff "
                "acknowledgement: what disaggregation adds to TTFT (count and sum).",
                labels=lab),
            "leases_expired": CounterMetricFamily("pdserve:kv_leases_expired", "Decode "
                                                  "reservations freed by lease expiry.",
                                                  labels=lab),
            "preemptions": CounterMetricFamily(
                "pdserve:worker_preemptions", "Running requests a worker evicted to free KV "
                "blocks (their KV is recomputed).", labels=lab),
            "preempted_tokens": CounterMetricFamily(
                "pdserve:worker_preempted_tokens", "Computed tokens whose KV those evictions "
                "dropped.", labels=lab),
            "solo_steps": CounterMetricFamily(
                "pdserve:worker_solo_prefill_steps", "Steps a worker ran short prompts in "
                "without its decode rows (those rows waited a step).", labels=lab),
            "store_hit_tokens": CounterMetricFamily(
                "pdserve:kv_store_hit_tokens", "Prompt tokens a worker loaded from the global "
                "KV store instead of computing them.", labels=lab),
            "store_saved_blocks": CounterMetricFamily(
                "pdserve:kv_store_saved_blocks", "KV blocks a worker saved to the global KV "
                "store.", labels=lab),
            "store_loaded_bytes": CounterMetricFamily(
                "pdserve:kv_store_loaded_bytes", "KV bytes a worker loaded from its node's "
                "store pool.", labels=lab),
            "store_load_seconds": CounterMetricFamily(
                "pdserve:kv_store_load_seconds", "Time a worker spent on those loads, copies "
                "and slot checks (bytes / seconds: its load bandwidth).", labels=lab),
            "store_pulled_blocks": CounterMetricFamily(
                "pdserve:kv_store_pulled_blocks", "KV blocks a worker pulled from another "
                "node's store pool into its own node's.", labels=lab),
            "store_pulled_bytes": CounterMetricFamily(
                "pdserve:kv_store_pulled_bytes", "KV bytes of those pulls.", labels=lab),
            "store_pull_seconds": CounterMetricFamily(
                "pdserve:kv_store_pull_seconds", "Time a worker spent pulling from other "
                "nodes' pools.", labels=lab),
            "store_save_skipped": CounterMetricFamily(
                "pdserve:kv_store_save_skipped", "KV blocks a worker meant to save to the "
                "store but dropped (Redis away, pool not mapped, no free slot).", labels=lab),
        }
        for s in self.snapshot:
            values = [self.model_name, s.worker_id, s.role]
            total, free = s.total_blocks, s.free_blocks
            fams["running"].add_metric(values, s.running)
            fams["waiting"].add_metric(values, s.waiting)
            fams["usage"].add_metric(values, (total - free) / total if total else 0.0)
            fams["free_blocks"].add_metric(values, free)
            fams["total_blocks"].add_metric(values, total)
            fams["prompt_tokens"].add_metric(values, s.prompt_tokens)
            fams["generated_tokens"].add_metric(values, s.generated_tokens)
            fams["store_hit_tokens"].add_metric(values, s.store_hit_tokens)
            fams["preemptions"].add_metric(values, s.preemptions)
            fams["preempted_tokens"].add_metric(values, s.preempted_tokens)
            fams["solo_steps"].add_metric(values, s.solo_steps)
            fams["store_saved_blocks"].add_metric(values, s.store_saved_blocks)
            for k in ("store_loaded_bytes", "store_load_seconds", "store_pulled_blocks",
                      "store_pulled_bytes", "store_pull_seconds", "store_save_skipped"):
                fams[k].add_metric(values, getattr(s, k))
            if s.role == "prefill":
                fams["handoffs"].add_metric(values, s.handoffs)
                fams["handoff_bytes"].add_metric(values, s.handoff_bytes)
                fams["handoff_seconds"].add_metric(values, s.handoffs, s.handoff_seconds)
                fams["handoff_tail_seconds"].add_metric(values, s.handoffs,
                                                        s.handoff_tail_seconds)
            else:
                fams["leases_expired"].add_metric(values, s.leases_expired)
        yield from fams.values()
        retries = CounterMetricFamily("pdserve:kv_handoff_retries", "KV handoffs retried on "
                                      "another worker pair.", labels=["model_name"])
        retries.add_metric([self.model_name], self.counters.handoff_retries)
        yield retries
        yield from self._store_families()
        for name, doc, value in (
                ("pdserve:request_migrations", "Requests moved off a dead decode worker "
                 "mid-stream.", self.counters.migrations),
                ("pdserve:workers_replaced", "Dead or hung workers replaced by new ones.",
                 self.counters.workers_replaced)):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        age = GaugeMetricFamily("pdserve:worker_stats_age_seconds", "Seconds since the worker "
                                "figures were polled (-1: never).", labels=["model_name"])
        age.add_metric([self.model_name], -1.0 if self.polled_at is None
                       else time.monotonic() - self.polled_at)
        yield age
