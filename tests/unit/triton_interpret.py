"""Run a test module's Triton kernels on the CPU through the Triton interpreter.

Call `use_interpreter()` at the top of the module, before anything imports triton: Triton
reads TRITON_INTERPRET when it (and each @triton.jit) is imported. `scripts/test.sh`
exports it for the whole run; this makes a single file run the same way.
"""

from __future__ import annotations

import os
import sys

import pytest


def use_interpreter() -> None:
    preloaded = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
    os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    if preloaded:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; export it in the "
                    "environment (scripts/test.sh does)", allow_module_level=True)
