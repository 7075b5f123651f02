"""The router process imports no torch (DESIGN.md, seams): its modules, the messages, the
launcher that runs it, and its tokenizer — built from the model's metadata, never its
weights — load in a fresh interpreter without torch, and tokenize exactly as the workers'
tokenizer does."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from pdserve.cluster.config import parse_config

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]

_PROBE = textwrap.dedent("""
    import importlib, json, pkgutil, sys

    import pdserve.router
    for info in pkgutil.iter_modules(pdserve.router.__path__):
        importlib.import_module(f"pdserve.router.{info.name}")
    import pdserve.router.grpc_server
    import pdserve.messages
    import pdserve.cluster.launcher  # the process that runs the router
    from pdserve.engine.loader.model_files import open_tokenizer

    name, chat = json.loads(sys.argv[1])
    tok = open_tokenizer(name)
    ids = tok.encode(tok.apply_chat_template(chat))
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    print(json.dumps({"ids": ids, "torch": loaded,
                      "router": sorted(m for m in sys.modules if m.startswith("pdserve.router"))}))
""")


def _probe(model: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps([model, CHAT])],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_router_modules_and_tokenizer_import_no_torch():
    model = parse_config({}).model.name  # the default model
    got = _probe(model)
    assert got["torch"] == [], f"the router process imported {got['torch'][:5]}"
    assert {"pdserve.router.lifecycle", "pdserve.router.grpc_server",
            "pdserve.router.policy", "pdserve.router.validation"} <= set(got["router"])
    # The same ids the workers' tokenizer (loaded with the weights) gives.
    from pdserve.engine.loader.registry import open_model

    tok = open_model(model).tokenizer
    assert got["ids"] == tok.encode(tok.apply_chat_template(CHAT))
    assert len(got["ids"]) > 10
