"""pdserve: disaggregated prefill/decode LLM serving on Ray.

Installed, this is the project's only top-level import name: `pdserve.engine`,
`pdserve.router`, `pdserve.cluster`, … are the repository's top-level folders, mapped under
it at packaging time (pyproject.toml, `[tool.setuptools.package-dir]`). In a source tree
that is not installed (a `ray job submit --working-dir .` upload, a checkout on sys.path),
the same names resolve because this package's search path then includes the repository
root, where those folders live.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

_here = os.path.dirname(os.path.abspath(__file__))
_root = os.path.dirname(_here)
# Installed copies have the subpackages beside this file; a source tree has them one up.
if not os.path.isdir(os.path.join(_here, "engine")) and os.path.isfile(
        os.path.join(_root, "engine", "__init__.py")):
    __path__.append(_root)  # noqa: F821 (a package's __path__)
