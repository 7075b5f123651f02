"""The layout key and the start-up handshake between KV peers (torch-free: the router
process runs the handshake over the workers' reported keys).

The `ContentKey` (engine.config) says what a block's numbers mean; the `LayoutKey` here
how one side holds them. `handshake` compares both for a sender/receiver pair and refuses,
naming the fields, what no transport can bridge.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from pdserve.engine.config import ContentKey, ModelConfig


@dataclass(frozen=True, slots=True)
class LayoutKey:
    """How one side (a worker: all its ranks and stages) holds its KV blocks.

    `kv_heads_per_rank` is what each TP rank's pool holds (1 when TP exceeds the model's
    KV-head count and each head is replicated on several ranks); `layers_per_stage` how many
    layers each pipeline stage's pool holds, in stage order. Two sides with equal content
    keys but different layout keys hold the same numbers cut differently: only a transport
    that reshards may connect them.
    """

    block_size: int
    kv_heads_per_rank: int
    head_dim: int
    layers_per_stage: tuple[int, ...]
    tp_size: int
    pp_size: int
    dtype: str

    @classmethod
    def for_model(cls, model: ModelConfig, block_size: int, dtype: str, tp_size: int = 1,
                  pp_size: int = 1) -> LayoutKey:
        from pdserve.engine.parallel import kv_heads_of_rank, layers_per_stage

        heads = kv_heads_of_rank(model.num_kv_heads, tp_size, 0)[1]  # ValueError if neither
        return cls(block_size, heads, model.head_dim,
                   layers_per_stage(model.num_layers, pp_size), tp_size, pp_size, dtype)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers_per_stage"] = list(self.layers_per_stage)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LayoutKey:
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            raise ValueError(f"LayoutKey fields must be exactly {sorted(names)}, got {sorted(d)}")
        return cls(**{**d, "layers_per_stage": tuple(int(n) for n in d["layers_per_stage"])})


class HandshakeError(ValueError):
    """Two sides cannot exchange KV blocks; the message names the fields that differ."""


# Layout fields no transport bridges by default: every difference is refused at start-up
# instead of failing each transfer.
RESHARDABLE_FIELDS: frozenset[str] = frozenset()

# What each transport reshards. `grpc`: KV heads — every sending rank sends each receiving
# rank the heads both hold (`kv_transfer.base.KVSender.routes`; a head replicated on
# several ranks, TP beyond the KV-head count, from one of them), so the two sides' TP
# sizes may differ (the content key already pins the total head count) — and the pipeline
# splits: each sending stage's ranks send their own layers, each receiving rank gets only
# the layers its stage holds (`KVSink.rank_layers`), and a receiver completes a request
# once every one of its layers arrived. Block size, head size and dtype must agree.
_HEADS = frozenset({"kv_heads_per_rank", "tp_size"})
_STAGES = frozenset({"layers_per_stage", "pp_size"})
_RESHARDS = {"grpc": _HEADS | _STAGES}
# Transports whose receivers can be pipeline stages (a sender routes by layers too).
_RECEIVES_STAGES: frozenset[str] = frozenset({"grpc"})


def reshardable_fields(transport: str) -> frozenset[str]:
    """The layout fields `transport` can bridge between a sender and a receiver (given
    that `receiver_problem` has nothing to say about the receiver)."""
    return _RESHARDS.get(transport, RESHARDABLE_FIELDS)


def receiver_problem(transport: str, name: str, layout: LayoutKey) -> str:
    """Why `transport` cannot deliver KV into a receiving side held as `layout`, naming the
    field ("" if it can): pipeline stages receive only where the transport routes layers
    to them."""
    if layout.pp_size > 1 and transport not in _RECEIVES_STAGES:
        return (f"{name} pp_size={layout.pp_size}: the {transport!r} transport delivers KV "
                "only into receivers of one pipeline stage")
    return ""


def handshake(a_name: str, a_content: ContentKey, a_layout: LayoutKey,
              b_name: str, b_content: ContentKey, b_layout: LayoutKey,
              reshardable: frozenset[str] = RESHARDABLE_FIELDS,
              transport: str | None = None) -> None:
    """Check that side `a` (say a prefill worker) may send KV to side `b` (a decode worker).

    Refuses, with a `HandshakeError` naming each differing field and both values
    ("prefill-0 tp_size=2, decode-0 tp_size=1"), a content mismatch of any kind and a
    layout difference in a field outside `reshardable`. With `transport` named, its
    reshardable fields are used and a receiving side it cannot deliver into is refused
    too (`receiver_problem`), whether or not the layouts differ.
    """
    if transport is not None:
        reshardable = reshardable_fields(transport)
    problems = []
    content = _differences(a_content.to_dict(), b_content.to_dict(), a_name, b_name)
    if content:
        problems.append(f"content differs (blocks would not mean the same thing): {content}")
    layout = _differences(a_layout.to_dict(), b_layout.to_dict(), a_name, b_name, reshardable)
    if layout:
        problems.append(f"KV layout differs in a way the transport cannot reshard: {layout}")
    receiver = receiver_problem(transport, b_name, b_layout) if transport else ""
    if receiver:
        problems.append(receiver)
    if problems:
        raise HandshakeError(f"{a_name} cannot send KV to {b_name}: " + "; ".join(problems))


def check_same_content(a_name: str, a_content: ContentKey, b_name: str,
                       b_content: ContentKey) -> None:
    """Refuse (naming the fields) two sides whose blocks would not mean the same thing,
    whatever their layouts: they must not share block hashes or a KV store."""
    content = _differences(a_content.to_dict(), b_content.to_dict(), a_name, b_name)
    if content:
        raise HandshakeError(f"{a_name} and {b_name} serve different content: {content}")


def _differences(a: dict, b: dict, a_name: str, b_name: str,
                 allowed: frozenset[str] = frozenset()) -> str:
    return "; ".join(f"{a_name} {k}={a[k]}, {b_name} {k}={b[k]}"
                     for k in a if a[k] != b[k] and k not in allowed)
