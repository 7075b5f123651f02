"""Resharding KV heads over the grpc transport (real loopback gRPC): every prefill rank
sends each decode rank exactly the heads both hold — no rank gathers — and a decode rank's
reservation completes only when every head of every block of every layer arrived."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from pdserve.engine.parallel import kv_heads_of_rank
from pdserve.kv_transfer import KVTransferError, TransferStatus
from pdserve.kv_transfer.base import HeadRoute
from pdserve.kv_transfer.grpc_transport import GrpcKVReceiver, GrpcKVSender

LAYERS, BLOCKS, BS, HEADS, DIM = 2, 8, 4, 6, 4
KEY = "k" * 16
SRC, DST = [5, 1, 6], [2, 7, 0]  # the request's blocks on each side
TOKENS = 3 * BS - 1


def _full() -> torch.Tensor:
    return torch.randn(LAYERS, 2, BLOCKS, BS, HEADS, DIM, generator=torch.Generator()
                       .manual_seed(0))


def _shard(pool: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    n = HEADS // tp
    return pool[..., rank * n:(rank + 1) * n, :].contiguous()


def _receivers(tp: int) -> list[GrpcKVReceiver]:
    return [GrpcKVReceiver(torch.zeros(LAYERS, 2, BLOCKS, BS, HEADS // tp, DIM), KEY)
            for _ in range(tp)]


def _sink(rxs: list[GrpcKVReceiver], rid: str):
    # Every rank's part of a reservation admits the driver rank's secret (rank_connector).
    first = rxs[0].expect(rid, DST, TOKENS, time.time() + 60)
    sinks = [first] + [rx.expect(rid, DST, TOKENS, time.time() + 60, secret=first.secret)
                       for rx in rxs[1:]]
    return replace(sinks[0], rank_addresses=tuple(rx.address for rx in rxs)) \
        if len(rxs) > 1 else sinks[0]


def _push(full: torch.Tensor, tp: int, sink, layers: int = LAYERS) -> None:
    for rank in range(tp):
        sender = GrpcKVSender(_shard(full, rank, tp), KEY, tp_rank=rank, tp_size=tp)
        handle = sender.open(sink, SRC)
        for layer in range(layers):
            handle.send_layer(layer)
        try:
            handle.finish(timeout=20)
        finally:
            sender.close()


def _check_landed(full: torch.Tensor, rxs: list[GrpcKVReceiver]) -> None:
    for j, rx in enumerate(rxs):
        want = _shard(full, j, len(rxs))[:, :, SRC]
        assert torch.equal(rx.pool[:, :, DST], want), f"decode rank {j}"


@pytest.mark.parametrize("p_tp,d_tp", [(2, 1), (1, 3), (2, 3), (3, 3)])
def test_heads_go_from_every_prefill_rank_to_the_decode_ranks_holding_them(p_tp, d_tp):
    full, rxs = _full(), _receivers(d_tp)
    try:
        sink = _sink(rxs, "r1")
        _push(full, p_tp, sink)
        assert [rx.status("r1") for rx in rxs] == [TransferStatus.COMPLETE] * d_tp
        _check_landed(full, rxs)
    finally:
        for rx in rxs:
            rx.close()


def test_routes_name_only_overlapping_heads():
    pool = torch.zeros(1, 2, 1, 1, 3, 1)  # rank 1 of TP 2 over 6 heads: heads 3, 4, 5
    sender = GrpcKVSender(pool, KEY, tp_rank=1, tp_size=2)
    rxs = _receivers(3)
    try:
        sink = _sink(rxs, "r1")
        assert sender.routes(sink) == [HeadRoute(rxs[1].address, 0, 1, 1),
                                       HeadRoute(rxs[2].address, 1, 2, 0)]
    finally:
        for rx in rxs:
            rx.close()


def test_one_part_is_not_complete_and_a_short_part_fails():
    full, (rx,) = _full(), _receivers(1)
    try:
        sink = _sink([rx], "r1")
        # Only prefill rank 0 of 2 sends: its part is acknowledged, the request is not done.
        sender = GrpcKVSender(_shard(full, 0, 2), KEY, tp_rank=0, tp_size=2)
        h = sender.open(sink, SRC)
        for layer in range(LAYERS):
            h.send_layer(layer)
        h.finish(timeout=20)
        assert rx.status("r1") is TransferStatus.PENDING
        # Rank 1 sends one layer of two and closes: that part is short, the request fails.
        sender1 = GrpcKVSender(_shard(full, 1, 2), KEY, tp_rank=1, tp_size=2)
        h1 = sender1.open(sink, SRC)
        h1.send_layer(0)
        with pytest.raises(KVTransferError):
            h1.finish(timeout=20)
        assert rx.wait("r1", 10) is TransferStatus.FAILED  # the abort reaches it async
        sender.close()
        sender1.close()
    finally:
        rx.close()


def test_a_decode_side_that_cannot_split_the_heads_is_refused_at_open():
    rxs = _receivers(3)
    try:
        sink = replace(_sink(rxs, "r1"), rank_addresses=tuple(rx.address for rx in rxs[:1])
                       + ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"))
        sender = GrpcKVSender(_shard(_full(), 0, 2), KEY, tp_rank=0, tp_size=2)
        with pytest.raises(ValueError, match="6 KV heads do not split over the decode "
                                             "worker's 4 ranks"):
            sender.open(sink, SRC)
    finally:
        for rx in rxs:
            rx.close()


def test_the_local_transport_refuses_to_reshard():
    from pdserve.kv_transfer.local_transport import LocalKVReceiver, LocalKVSender

    rx = LocalKVReceiver(torch.zeros(LAYERS, 2, BLOCKS, BS, HEADS, DIM), KEY)
    try:
        sink = rx.expect("r1", DST, TOKENS, time.time() + 60)
        sender = LocalKVSender(_shard(_full(), 0, 2), KEY, tp_rank=0, tp_size=2)
        with pytest.raises(ValueError, match="does not reshard"):
            sender.open(sink, SRC)
    finally:
        rx.close()


# ---- pipeline stages: each stage's ranks send their own layers ------------------------------

STAGE_LAYERS = (2, 1)  # 3 layers over 2 stages, unevenly (the first takes the remainder)


def _stage_pool(full: torch.Tensor, stage: int, rank: int, tp: int) -> torch.Tensor:
    first = sum(STAGE_LAYERS[:stage])
    return _shard(full[first:first + STAGE_LAYERS[stage]], rank, tp).contiguous()


def _push_stage(full: torch.Tensor, stage: int, tp: int, sink) -> None:
    first = sum(STAGE_LAYERS[:stage])
    for rank in range(tp):
        sender = GrpcKVSender(_stage_pool(full, stage, rank, tp), KEY, tp_rank=rank,
                              tp_size=tp, first_layer=first)
        try:
            handle = sender.open(sink, SRC)
            for layer in range(STAGE_LAYERS[stage]):  # the stage pool's own layer indices
                handle.send_layer(layer)
            handle.finish(timeout=20)
        finally:
            sender.close()


def _stage_receivers(tp: int) -> list[GrpcKVReceiver]:
    layers = sum(STAGE_LAYERS)
    return [GrpcKVReceiver(torch.zeros(layers, 2, BLOCKS, BS, HEADS // tp, DIM), KEY)
            for _ in range(tp)]


@pytest.mark.parametrize("p_tp,d_tp", [(1, 1), (1, 2), (2, 1), (3, 2)])
def test_every_stage_sends_its_layers_and_the_request_completes_with_the_last(p_tp, d_tp):
    full = torch.randn(sum(STAGE_LAYERS), 2, BLOCKS, BS, HEADS, DIM,
                       generator=torch.Generator().manual_seed(1))
    rxs = _stage_receivers(d_tp)
    try:
        sink = _sink(rxs, "r1")
        _push_stage(full, 1, p_tp, sink)  # the later stage may well finish first
        assert [rx.status("r1") for rx in rxs] == [TransferStatus.PENDING] * d_tp
        assert [rx.layers_received("r1") for rx in rxs] == [1] * d_tp
        _push_stage(full, 0, p_tp, sink)
        assert [rx.status("r1") for rx in rxs] == [TransferStatus.COMPLETE] * d_tp
        _check_landed(full, rxs)
    finally:
        for rx in rxs:
            rx.close()


def test_a_stage_that_sends_short_of_its_range_fails_the_request():
    full = torch.randn(sum(STAGE_LAYERS), 2, BLOCKS, BS, HEADS, DIM)
    (rx,) = _stage_receivers(1)
    try:
        sink = _sink([rx], "r1")
        _push_stage(full, 1, 1, sink)
        sender = GrpcKVSender(_stage_pool(full, 0, 0, 1), KEY)
        handle = sender.open(sink, SRC)
        handle.send_layer(0)  # of its two
        with pytest.raises(KVTransferError, match="finish before layers"):
            handle.finish(timeout=20)
        assert rx.wait("r1", 10) is TransferStatus.FAILED
        sender.close()
    finally:
        rx.close()


def test_a_closing_range_outside_the_pool_fails_the_request():
    (rx,) = _stage_receivers(1)
    try:
        sink = _sink([rx], "r1")
        with pytest.raises(KVTransferError, match="sender said layers 2..3"):
            rx.finish("r1", 2, part_complete=True, secret=sink.secret, first_layer=2)
        assert rx.status("r1") is TransferStatus.FAILED
    finally:
        rx.close()


# ---- receiving pipeline stages: each sending rank sends each receiving rank the layers
# (and heads) both hold -------------------------------------------------------------------

D_STAGES = (1, 2)  # the decode worker's split of the same 3 layers, unlike the prefill's


def _stage_sink(full: torch.Tensor, d_tp: int, rid: str):
    """Receivers of a decode worker of len(D_STAGES) stages x d_tp ranks (stage-major)."""
    rxs, firsts = [], []
    for stage, n in enumerate(D_STAGES):
        for _ in range(d_tp):
            rxs.append(GrpcKVReceiver(torch.zeros(n, 2, BLOCKS, BS, HEADS // d_tp, DIM), KEY))
            firsts.append(sum(D_STAGES[:stage]))
    sink = replace(_sink(rxs, rid), rank_layers=tuple(firsts))
    return rxs, sink


@pytest.mark.parametrize("p_tp,d_tp", [(1, 1), (2, 1), (1, 2), (3, 2)])
def test_prefill_stages_send_each_decode_stage_only_the_layers_it_holds(p_tp, d_tp):
    full = torch.randn(sum(STAGE_LAYERS), 2, BLOCKS, BS, HEADS, DIM,
                       generator=torch.Generator().manual_seed(2))
    rxs, sink = _stage_sink(full, d_tp, "r1")
    try:
        _push_stage(full, 0, p_tp, sink)  # layers 0, 1: decode stage 0's and half of 1's
        states = [rx.status("r1") for rx in rxs]
        assert states == [TransferStatus.COMPLETE] * d_tp + [TransferStatus.PENDING] * d_tp
        _push_stage(full, 1, p_tp, sink)
        assert [rx.status("r1") for rx in rxs] == [TransferStatus.COMPLETE] * (2 * d_tp)
        for j, rx in enumerate(rxs):
            stage, t = divmod(j, d_tp)
            first = sum(D_STAGES[:stage])
            want = _shard(full[first:first + D_STAGES[stage]], t, d_tp)[:, :, SRC]
            assert torch.equal(rx.pool[:, :, DST], want), f"decode rank {j}"
    finally:
        for rx in rxs:
            rx.close()


def test_a_sink_whose_ranks_are_not_equal_stages_is_refused_at_open():
    rxs = _receivers(3)
    try:
        sink = replace(_sink(rxs, "r1"), rank_layers=(0, 2, 2))
        sender = GrpcKVSender(_full(), KEY)
        with pytest.raises(ValueError, match="not equal stages"):
            sender.open(sink, SRC)
    finally:
        for rx in rxs:
            rx.close()


# Replicated KV heads: TP beyond the model's KV-head count puts head `r * kv // tp` on
# rank r (engine.parallel.kv_heads_of_rank), on either side of the transfer.
def _held(full: torch.Tensor, kv: int, rank: int, tp: int) -> torch.Tensor:
    first, count = kv_heads_of_rank(kv, tp, rank)
    return full[..., first:first + count, :].contiguous()


@pytest.mark.parametrize("kv,p_tp,d_tp", [(1, 2, 1), (1, 1, 2), (1, 2, 2), (2, 4, 1),
                                          (2, 1, 4)])
def test_replicated_heads_reach_each_decode_rank_from_exactly_one_replica(kv, p_tp, d_tp):
    full = _full()[..., :kv, :].contiguous()  # a model of `kv` KV heads
    rxs = [GrpcKVReceiver(torch.zeros(LAYERS, 2, BLOCKS, BS, max(1, kv // d_tp), DIM), KEY)
           for _ in range(d_tp)]
    try:
        sink = _sink(rxs, "r1")
        senders = [GrpcKVSender(_held(full, kv, r, p_tp), KEY, tp_rank=r, tp_size=p_tp,
                                num_kv_heads=kv) for r in range(p_tp)]
        routes = [s.routes(sink) for s in senders]
        # Each (decode rank, head) pair is covered by exactly one sending rank's route.
        for j, rx in enumerate(rxs):
            first, count = kv_heads_of_rank(kv, d_tp, j)
            covered = sorted(h for rs in routes for r in rs if r.address == rx.address
                             for h in range(r.dst_first, r.dst_first + r.count))
            assert covered == list(range(count)), f"decode rank {j} (heads from {first})"
        for sender in senders:
            handle = sender.open(sink, SRC)  # a replica with no route has nothing to send
            for layer in range(LAYERS):
                handle.send_layer(layer)
            handle.finish(timeout=20)
            sender.close()
        assert [rx.status("r1") for rx in rxs] == [TransferStatus.COMPLETE] * d_tp
        for j, rx in enumerate(rxs):
            assert torch.equal(rx.pool[:, :, DST], _held(full, kv, j, d_tp)[:, :, SRC])
        # Nothing beyond the routes was sent: one chunk per route and layer (the request's
        # 3 blocks fit in one), so no replica sent a head a second time.
        assert [rx.chunks_written for rx in rxs] == [
            LAYERS * sum(r.address == rx.address for rs in routes for r in rs) for rx in rxs]
    finally:
        for rx in rxs:
            rx.close()


def test_a_replicated_sender_must_hold_one_head():
    with pytest.raises(ValueError, match="holds 1 of them, its pool 2"):
        GrpcKVSender(torch.zeros(1, 2, 1, 1, 2, 1), KEY, tp_rank=0, tp_size=2, num_kv_heads=1)
