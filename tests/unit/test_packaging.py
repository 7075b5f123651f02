"""Installed, pdserve adds one top-level import name (`pdserve`); the repository keeps its
top-level folders, mapped under that name by pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("engine", "cluster", "prefill_worker", "decode_worker", "router", "kv_transfer",
           "kv_store", "proto", "bench")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
    """A new subpackage that is not in pyproject's list would be missing from a wheel."""
    setup = _pyproject()["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = {"pdserve"}
    for folder in FOLDERS:
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT).parts
            found.add(".".join(("pdserve", *rel)))
    assert found == listed
    assert setup["package-dir"] == {
        f"pdserve.{f}": f for f in FOLDERS if (ROOT / f / "__init__.py").exists()}


def test_serving_dependencies_are_not_optional():
    """A plain `pip install .` must give a `pdserve serve` that runs: only GPU extras."""
    deps = " ".join(_pyproject()["project"]["dependencies"])
    for name in ("ray", "grpcio", "protobuf", "msgpack", "pydantic", "pyyaml"):
        assert name in deps
    assert set(_pyproject()["project"]["optional-dependencies"]) <= {"gpu", "test", "bench"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A non-editable install of this checkout (no dependencies) into a fresh folder."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-compile", "--target", str(target), str(ROOT)],
        check=True, capture_output=True, cwd=build,
        env={"PATH": "/usr/bin:/bin", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "TMPDIR": str(build)})
    return target


def test_install_adds_only_pdserve(installed):
    top = {p.name for p in installed.iterdir() if p.name not in ("bin",)}
    top = {n for n in top if not n.endswith(".dist-info")}
    assert top == {"pdserve"}


def test_installed_names_import_and_repo_names_do_not(installed, tmp_path):
    code = (
        "import importlib.util, sys\n"
        "import pdserve, pdserve.router.grpc_server, pdserve.cluster.cli, pdserve.bench.cli\n"
        "import pdserve.proto\n"
        "assert pdserve.__path__ == [sys.argv[1] + '/pdserve'], pdserve.__path__\n"
        "for name in ('engine', 'router', 'cluster', 'bench', 'kv_transfer', 'pdserve_proto'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
    )
    # Run from an empty folder with only the install on the path: nothing of the checkout.
    subprocess.run([sys.executable, "-I", "-c",
                    f"import sys; sys.path.insert(0, {str(installed)!r}); exec({code!r})",
                    str(installed)],
                   check=True, cwd=tmp_path, capture_output=True)
