"""Transports register by name; workers build theirs from config with `make_*`.

Built-in transports are imported on first use, so a process that only needs `local` never
imports grpc, and the GPU-only `nccl` transport (CuPy) is imported only where it is asked for.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

import torch

from pdserve.kv_transfer.base import KVReceiver, KVSender

_BUILTIN_MODULES = {
    "grpc": "pdserve.kv_transfer.grpc_transport",
    "local": "pdserve.kv_transfer.local_transport",
    "nccl": "pdserve.kv_transfer.nccl_transport",
}
_TRANSPORTS: dict[str, tuple[type[KVSender], type[KVReceiver]]] = {}
_LOCK = threading.Lock()


def register_transport(name: str, sender_cls: type[KVSender],
                       receiver_cls: type[KVReceiver]) -> None:
    """Make `name` available to `make_sender` / `make_receiver` (re-registering replaces)."""
    with _LOCK:
        _TRANSPORTS[name] = (sender_cls, receiver_cls)


def _lookup(name: str) -> tuple[type[KVSender], type[KVReceiver]]:
    with _LOCK:
        found = _TRANSPORTS.get(name)
    if found is None and name in _BUILTIN_MODULES:
        try:
            module = importlib.import_module(_BUILTIN_MODULES[name])
        except ModuleNotFoundError as e:
            if e.name != _BUILTIN_MODULES[name]:
                raise
            raise ValueError(f"KV transport {name!r} is not available in this build") from None
        found = (module.SENDER, module.RECEIVER)
        register_transport(name, *found)
    if found is None:
        raise ValueError(f"unknown KV transport {name!r}; known: {available_transports()}")
    return found


def available_transports() -> list[str]:
    with _LOCK:
        return sorted(set(_TRANSPORTS) | set(_BUILTIN_MODULES))


def make_receiver(name: str, pool: torch.Tensor, compat_key: str, /, **opts: Any) -> KVReceiver:
    """The decode side of transport `name`, bound to `pool`; `opts` go to its constructor.

    The first three are positional-only, so a transport option may itself be called `name`
    (the `local` and `nccl` receivers take the decode worker's id that way)."""
    return _lookup(name)[1](pool, compat_key, **opts)


def make_sender(name: str, pool: torch.Tensor, compat_key: str, /, **opts: Any) -> KVSender:
    """The prefill side of transport `name`, bound to `pool`; `opts` go to its constructor."""
    return _lookup(name)[0](pool, compat_key, **opts)
