"""The YAML schema of a pdserve cluster, validated strictly at load time.

Unknown keys are rejected (a typo must not silently fall back to a default), and
cross-field rules that would otherwise fail minutes later inside a worker are checked here
with a message that names the fields: prefill and decode share model, dtype and block size
by construction (they are top-level keys), a `local` transport cannot cross nodes, etc.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pdserve.engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig

if TYPE_CHECKING:
    from pdserve.tls import TLSFiles


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    name: str = "smollm2-135m-instruct"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_model_len: int | None = Field(default=None, ge=16)


class KVSection(_Strict):
    block_size: int = Field(default=16, ge=1)
    memory_mb: int = Field(default=256, ge=1, description="KV pool per worker, MiB")
    enable_prefix_caching: bool = True

    @model_validator(mode="after")
    def _power_of_two(self):
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"kv.block_size must be a power of two, got {self.block_size}")
        return self


class PoolSection(_Strict):
    """One pool of identical workers (prefill or decode)."""

    count: int = Field(default=1, ge=0)
    num_cpus: float = Field(default=0.5, gt=0, description="Ray logical CPUs per worker")
    num_gpus: float = Field(default=0, ge=0)
    threads: int | Literal["auto"] = Field(
        default="auto", description="compute threads (torch/OpenMP) per rank, or 'auto': "
        "split the machine's cores between the ranks of a locally started cluster, the "
        "decode side first (cluster/thread_budget.py); in a joined cluster, the rank's "
        "whole Ray CPUs (num_cpus, at least 1)")
    device: str = "cpu"
    resources: dict[str, float] = Field(default_factory=dict,
                                        description="custom Ray resources to pin the pool")
    node_labels: dict[str, str] = Field(default_factory=dict,
                                        description="Ray node labels the pool must run on")
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=512, ge=1)
    solo_prefill_tokens: int | Literal["auto"] = Field(
        default="auto", description="prompts that all finish within this many tokens run "
        "in a step of their own, without the decode rows (not twice in a row), so their "
        "first token does not wait for the rows' compute; 0: always mixed with the decode "
        "rows; 'auto': 128 on CPU, 0 on CUDA (engine/scheduler.py, solo prefills)")
    tp: int = Field(default=1, ge=1, description="tensor-parallel ranks per worker (one Ray "
                    "actor each, packed on one node)")
    pp: int = Field(default=1, ge=1, description="pipeline stages per worker")
    pp_overlap: bool = Field(
        default=True, description="with pp > 1: keep up to one step a stage in flight, each "
        "over other requests, so the stages work at once across steps (off: each step "
        "waits for the one before)")
    pp_placement: Literal["pack", "spread", "strict_spread"] = Field(
        default="pack", description="where a worker's pipeline stages go: pack (every rank "
        "on one node), spread (each stage's ranks on one node, the stages on different nodes "
        "where Ray can place them so, else sharing one), strict_spread (each stage on a node "
        "of its own, or the worker does not start). Ranks on one node meet over loopback; "
        "stages on several nodes rendezvous at rank 0's node IP (cluster/rank_groups.py)")
    collective_timeout_s: float = Field(
        default=30.0, gt=0, description="how long a rank waits for the others in one "
        "collective before its worker fails (a dead or hung rank)")
    transfer_host: str = Field(
        default="127.0.0.1", min_length=1,
        description="interface a decode worker's KV receiver binds: an address, 'node-ip' "
        "(the worker's node's Ray IP: what multi-node clusters need), or 0.0.0.0 / :: (every "
        "interface, the node's IP advertised)")

    @model_validator(mode="after")
    def _placement_needs_stages(self):
        if self.pp_placement != "pack" and self.pp == 1:
            raise ValueError(f"pp_placement '{self.pp_placement}' places pipeline stages, but "
                             "pp is 1: a worker of one stage is packed on one node")
        return self

    @model_validator(mode="after")
    def _solo_prefill_not_negative(self):
        if self.solo_prefill_tokens != "auto" and self.solo_prefill_tokens < 0:
            raise ValueError(
                f"solo_prefill_tokens must be >= 0 or 'auto', got {self.solo_prefill_tokens}")
        return self

    @model_validator(mode="after")
    def _threads_positive(self):
        if self.threads != "auto" and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or 'auto', got {self.threads}")
        return self

    def rank_threads(self) -> int:
        """The threads one rank runs with: `threads`, or for 'auto' left unresolved (a
        joined cluster, or a worker built outside the launcher) its whole Ray CPUs."""
        return self.threads if self.threads != "auto" else max(1, int(self.num_cpus))


class RouterSection(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    http_host: str = Field(default="127.0.0.1", min_length=1,
                           description="interface of the OpenAI-compatible HTTP API")
    http_port: int | None = Field(
        default=8000, ge=0, le=65535, description="port of the OpenAI-compatible HTTP API "
        "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics); null: off")
    max_queue: int = Field(default=256, ge=1, description="requests in flight before "
                           "RESOURCE_EXHAUSTED")
    max_tokens_limit: int = Field(default=2048, ge=1)
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    max_request_bytes: int = Field(default=1 << 20, ge=1024)
    handoff_retries: int = Field(default=2, ge=0)
    lease_seconds: float = Field(default=30.0, gt=0)
    admission_timeout: float = Field(
        default=120.0, gt=0, description="how long a request may wait for free decode KV "
        "blocks before RESOURCE_EXHAUSTED")
    auth_token_env: str | None = Field(
        default=None, description="name of an environment variable holding the bearer token")
    conditional_prefill_tokens: int = Field(
        default=0, ge=0, description="prompts whose uncached part is this short are "
        "prefilled on the decode worker (the cached part counts with policy kv_aware)")
    policy: Literal["least_loaded", "kv_aware"] | None = Field(
        default=None, description="routing policy: least_loaded (fewest prefills in "
        "flight, most free decode blocks) or kv_aware (lowest expected time to first token, "
        "counting the prefix each worker and its node's KV store hold; needs "
        "kv_store.enabled); unset: kv_aware when kv_store.enabled, else least_loaded")


class TLSSection(_Strict):
    """TLS on the router's gRPC and HTTP ports and on the grpc KV transport (docs/security.md).

    Paths only: the PEM files are read on each node where they are used (the router's
    node, every decode and prefill worker's node), so they must exist there at these paths.
    """

    cert_file: str = Field(min_length=1, description="PEM certificate (chain) the router and "
                           "every decode worker's KV receiver present")
    key_file: str = Field(min_length=1, description="PEM private key of cert_file")
    ca_file: str | None = Field(
        default=None, min_length=1, description="PEM CA certificate(s) the prefill workers "
        "verify the KV receivers against (default: the system's roots); with mutual_kv, the "
        "receivers verify the prefill workers against it too")
    mutual_kv: bool = Field(
        default=False, description="mutual TLS between nodes: KV receivers require a client "
        "certificate chained to ca_file, and prefill workers present cert_file")
    kv_server_name: str | None = Field(
        default=None, min_length=1, description="name the prefill workers expect in the KV "
        "receivers' certificate (default: the host of the receiver's address), for one "
        "certificate with a DNS name shared by every node")

    def router_files(self) -> TLSFiles:
        """What the router's gRPC and HTTP listeners serve with."""
        from pdserve.tls import TLSFiles
        return TLSFiles(self.cert_file, self.key_file)

    def receiver_files(self) -> TLSFiles:
        """What a decode worker's KV receiver serves with (client certificates required
        under mutual_kv)."""
        from pdserve.tls import TLSFiles
        return TLSFiles(self.cert_file, self.key_file, self.ca_file,
                        require_client_cert=self.mutual_kv)

    def sender_files(self) -> TLSFiles:
        """What a prefill worker's KV sender connects with (its certificate under
        mutual_kv)."""
        from pdserve.tls import TLSFiles
        if self.mutual_kv:
            return TLSFiles(self.cert_file, self.key_file, self.ca_file,
                            server_name=self.kv_server_name)
        return TLSFiles(ca_file=self.ca_file, server_name=self.kv_server_name)

    @model_validator(mode="after")
    def _mutual_needs_ca(self):
        if self.mutual_kv and self.ca_file is None:
            raise ValueError("tls.mutual_kv needs tls.ca_file (the CA the peers' "
                             "certificates are checked against)")
        return self


class RaySection(_Strict):
    address: str | None = Field(default=None, description="unset: start a local Ray; "
                                "'auto' or ray://host:port: join")
    num_cpus: float | None = Field(default=None, gt=0,
                                   description="logical CPUs of a locally started Ray")
    namespace: str = "pdserve"
    node_ip_address: str = Field(
        default="127.0.0.1", min_length=1,
        description="node address of a locally started Ray (ray.address unset): 127.0.0.1 "
        "keeps every Ray listener on loopback; a host address lets other hosts reach it, and "
        "then Ray listens on every interface (docs/deploy.md lists the ports)")

    @model_validator(mode="after")
    def _node_ip_only_for_local(self):
        try:
            ip = ipaddress.ip_address(self.node_ip_address)
        except ValueError:
            raise ValueError(f"ray.node_ip_address must be an IP address, got "
                             f"{self.node_ip_address!r}") from None
        if ip.is_unspecified:
            raise ValueError("ray.node_ip_address must be an address other hosts can reach "
                             f"(or 127.0.0.1), not the wildcard {self.node_ip_address}: Ray "
                             "advertises it")
        # Compared with the default, not "was it set": a config dumped and parsed again
        # (the CLI's overrides) sets every field.
        if self.address and self.node_ip_address != "127.0.0.1":
            raise ValueError("ray.node_ip_address applies only to a locally started Ray "
                             "(ray.address unset); the nodes of a joined cluster choose theirs "
                             "with `ray start --node-ip-address`")
        return self


class HealthSection(_Strict):
    """How the launcher's supervisor watches the workers (cluster/supervisor.py)."""

    probe_interval: float = Field(default=0.5, gt=0, description="seconds between probes of "
                                  "every worker")
    probe_timeout: float = Field(default=10.0, gt=0, description="a worker that does not "
                                 "answer a probe within this many seconds is hung: it is "
                                 "taken out of routing and replaced")
    replace_workers: bool = Field(default=True, description="start a new worker in place of "
                                  "a dead or hung one")
    replace_timeout: float = Field(default=600.0, gt=0, description="how long a replacement "
                                   "may take to become ready before it is tried again")


class KVStoreSection(_Strict):
    """The global KV store (kv_store/): a Redis index and one CPU block pool per node that
    every worker on the node shares; off unless `enabled`."""

    enabled: bool = False
    redis_url: str | None = Field(
        default=None, description="redis:// or rediss:// URL (password, TLS) of the index; "
        "unset: start a private redis-server on loopback, which only workers on the router's "
        "node reach (set it for multi-node clusters)")
    pool_mb: int = Field(default=512, ge=1, description="CPU block pool per node, MiB")
    shm_dir: str = Field(default="/dev/shm", min_length=1,
                         description="where the pool file is mapped from (shared memory)")
    pin_lease_seconds: float = Field(default=30.0, gt=0, description="how long a read pin "
                                     "outlives a worker that died while loading")
    store_lease_seconds: float = Field(default=2.0, gt=0, description="how long a node's pool "
                                       "stays findable after its store process died")
    verify: Literal["header", "crc"] = Field(
        default="header", description="what a load checks of each stored block before "
        "using it: 'header' (hash and generation, read again after the copy; the slots are "
        "pinned meanwhile) or 'crc' (also a CRC32 of every byte, computed on save and on "
        "the lookup's critical path: catches bytes changed in place, at memory speed)")
    pull_timeout_seconds: float = Field(
        default=5.0, gt=0, description="how long a worker may spend pulling a prefix that "
        "only another node's pool holds into its own node's pool (over gRPC, before the "
        "request reaches its engine); past it the request goes on with what arrived")
    cache_events: bool = Field(default=True, description="workers publish their own prefix "
                               "caches to the index and the KV-aware router reads them "
                               "exactly; false: it estimates them from what it routed")
    cache_events_ttl_seconds: float = Field(default=10.0, gt=1.0, description="how long a "
                                            "worker's published cache outlives its process")


class DebugSection(_Strict):
    inject_transfer_failures: int = Field(default=0, ge=0,
                                          description="fail the first N KV handoffs (tests)")
    misroute_rank_pushes: int = Field(
        default=0, ge=0, description="each prefill follower rank sends its part of its first "
        "N KV pushes to a loopback port nobody listens on (tests: a part that fails without "
        "the decode side hearing of it)")


class ClusterConfig(_Strict):
    model: ModelSection = Field(default_factory=ModelSection)
    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    transport: Literal["grpc", "local", "nccl"] = "grpc"
    kv: KVSection = Field(default_factory=KVSection)
    prefill: PoolSection = Field(default_factory=PoolSection)
    decode: PoolSection = Field(default_factory=PoolSection)
    router: RouterSection = Field(default_factory=RouterSection)
    ray: RaySection = Field(default_factory=RaySection)
    health: HealthSection = Field(default_factory=HealthSection)
    kv_store: KVStoreSection = Field(default_factory=KVStoreSection)
    debug: DebugSection = Field(default_factory=DebugSection)
    tls: TLSSection | None = Field(default=None, description="unset: plaintext listeners")

    @model_validator(mode="after")
    def _consistent(self):
        if self.decode.count < 1:
            raise ValueError("decode.count must be >= 1: decode workers serve every request")
        if self.mode == "disaggregated" and self.prefill.count < 1:
            raise ValueError("mode 'disaggregated' needs prefill.count >= 1")
        if self.transport == "local":
            raise ValueError("transport 'local' works only inside one process; use 'grpc' "
                             "between Ray workers (or 'nccl' on GPUs)")
        if self.transport == "nccl" and (self.prefill.num_gpus < 1 or self.decode.num_gpus < 1):
            raise ValueError("transport 'nccl' needs prefill.num_gpus and decode.num_gpus >= 1")
        for name, pool in (("prefill", self.prefill), ("decode", self.decode)):
            if pool.device.startswith("cuda") and pool.num_gpus <= 0:
                raise ValueError(f"{name}.device is {pool.device!r} but {name}.num_gpus is 0")
        if self.router.policy == "kv_aware" and not self.kv_store.enabled:
            raise ValueError("router.policy 'kv_aware' needs kv_store.enabled (its index "
                             "says where prefixes are cached)")
        if self.tls is not None and self.tls.mutual_kv and self.transport != "grpc":
            raise ValueError("tls.mutual_kv applies to the grpc KV transport; the nccl "
                             "transport's announces are admitted by the reservation secret")
        self._check_parallelism()
        return self

    def _check_parallelism(self) -> None:
        """Refuse TP/PP sizes the model cannot be split into, naming the reason, before
        any worker loads a weight (reads the model's metadata only when a pool is split)."""
        pools = [("decode", self.decode)]
        if self.mode == "disaggregated":
            pools.insert(0, ("prefill", self.prefill))
        split = [(name, pool) for name, pool in pools if pool.tp * pool.pp > 1]
        if not split:
            return
        for name, pool in split:
            if self.mode == "disaggregated" and self.transport != "grpc":
                raise ValueError(
                    f"{name}.tp={pool.tp}, {name}.pp={pool.pp} in mode 'disaggregated' needs "
                    f"transport 'grpc' (each rank sends the KV heads and layers it holds to "
                    f"the peer ranks holding them; '{self.transport}' sends whole pools only)")
        from pdserve.engine.loader.model_files import read_model_shape

        shape = read_model_shape(self.model.name)
        for name, pool in split:
            problem = parallelism_problem(shape, pool.tp, pool.pp)
            if problem:
                raise ValueError(f"{name}.tp={pool.tp}, {name}.pp={pool.pp} cannot serve "
                                 f"{self.model.name}: {problem}")

    @property
    def routing_policy(self) -> str:
        """`router.policy`, its default resolved (kv_aware exactly when the store runs)."""
        return self.router.policy or ("kv_aware" if self.kv_store.enabled else "least_loaded")

    def engine_config(self, pool: PoolSection) -> EngineConfig:
        """The engine settings one worker of `pool` runs with."""
        return EngineConfig(
            model=self.model.name,
            dtype=self.model.dtype,
            device=pool.device,
            cache=CacheConfig(block_size=self.kv.block_size, memory_bytes=self.kv.memory_mb << 20,
                              enable_prefix_caching=self.kv.enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=pool.max_num_seqs,
                                      max_num_batched_tokens=pool.max_num_batched_tokens,
                                      max_model_len=self.model.max_model_len,
                                      solo_prefill_tokens=None
                                      if pool.solo_prefill_tokens == "auto"
                                      else pool.solo_prefill_tokens),
            num_threads=pool.rank_threads(),
            parallel=ParallelConfig(tensor_parallel_size=pool.tp,
                                    pipeline_parallel_size=pool.pp,
                                    pipeline_overlap=pool.pp_overlap),
        )


def parallelism_problem(shape: dict[str, int], tp: int, pp: int) -> str:
    """Why a model of `shape` (`read_model_shape`) cannot be split into `tp` tensor-parallel
    ranks and `pp` stages ("" if it can): every rank must hold whole query heads, an
    equal slice of the MLP and of the vocabulary, and whole KV heads — an equal share, or,
    when `tp` exceeds their count and is a multiple of it, one head replicated on
    `tp // num_kv_heads` ranks (as vLLM does); every stage at least one layer."""
    reasons = []
    kv = shape["num_kv_heads"]
    if kv % tp and tp % kv:
        reasons.append(f"its {kv} KV heads neither split into {tp} equal shares nor "
                       f"replicate evenly over {tp} ranks ({tp} is not a multiple of {kv})")
    for field, what in (("num_heads", "query heads"),
                        ("intermediate_size", "MLP features"),
                        ("vocab_size", "vocabulary entries")):
        if shape[field] % tp:
            reasons.append(f"its {shape[field]} {what} do not split into {tp} equal shares")
    if pp > shape["num_layers"]:
        reasons.append(f"its {shape['num_layers']} layers cannot fill {pp} pipeline stages")
    return "; ".join(reasons)


class ConfigError(ValueError):
    """A config file that cannot be used; the message says which field and why."""


def load_config(path: str | Path) -> ClusterConfig:
    """Read a YAML file with `safe_load` and validate it; ConfigError on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return parse_config(raw, str(p))


def parse_config(raw: dict, source: str = "config") -> ClusterConfig:
    try:
        return ClusterConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(lines)) from None
