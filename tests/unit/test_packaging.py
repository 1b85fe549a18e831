"""FAISS extras that cannot clash: exactly one of faiss-cpu / faiss-gpu per install, and a clear
error when neither is there. Read from setup.cfg the way a resolver reads the wheel's metadata
(PEP 508 markers evaluated per extra), and checked on a real import."""
from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
FAISS = {"faiss-cpu", "faiss-gpu"}


def _requirements() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    base = [Requirement(line) for line in cfg["options"]["install_requires"].split("\n") if line.strip()]
    extras = {name: [Requirement(line) for line in value.split("\n") if line.strip() and not line.startswith("#")]
              for name, value in cfg["options.extras_require"].items()}
    return base, extras


def _faiss_installed_with(chosen: set[str]) -> set[str]:
    """The FAISS distributions `pip install edje-search[chosen]` pulls in (markers evaluated as pip does)."""
    base, extras = _requirements()
    picked = set()
    for extra in [""] + sorted(chosen):
        reqs = base if not extra else extras[extra]
        for req in reqs:
            env = {"extra": extra}
            if req.name.lower() in FAISS and (req.marker is None or req.marker.evaluate(env)):
                picked.add(req.name.lower())
    return picked


def test_each_faiss_extra_installs_exactly_its_own_faiss():
    assert _faiss_installed_with({"cpu"}) == {"faiss-cpu"}
    assert _faiss_installed_with({"gpu"}) == {"faiss-gpu"}
    assert _faiss_installed_with({"gpu", "ray", "dev"}) == {"faiss-gpu"}
    assert _faiss_installed_with(set()) == set()  # neither by default: the import error below says what to do


def test_ray_is_an_extra_not_a_dependency():
    base, extras = _requirements()
    assert not any(r.name == "ray" for r in base)
    assert any(r.name == "ray" and "data" in r.extras for r in extras["ray"])


def test_missing_faiss_is_a_clear_error_at_import():
    code = ("import sys; sys.modules['faiss'] = None\n"  # as if no faiss package were installed
            "try:\n    import edje_search.storage.vector_index\n"
            "except ImportError as e:\n    print(e)\nelse:\n    print('imported')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "pip install 'edje-search[cpu]'" in out.stdout and "edje-search[gpu]" in out.stdout, out.stdout + out.stderr
