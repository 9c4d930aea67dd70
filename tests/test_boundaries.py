"""The architecture's boundaries, checked on the real tree; each rule also shown to fail.

Rules (docs/architecture.md "Boundaries"):
- no import cycle between modules, and none between parts (the folders of orchestrator/);
- `remote_payload` and `ngp_train` never import `orchestrator` (they run on the host);
- `orchestrator` imports of `ngp_train` / `remote_payload` are limited to their stdlib-only
  contract modules (and the mirror-source resolver shared with the host), and importing every
  controller module pulls in no torch (the controller installs without it);
- providers import neither the transports (except the `Endpoint` value module) nor the ledger.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import importgraph as ig
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_WITH_HOST = ("ngp_train.contract", "remote_payload.contract", "remote_payload.stage.sources")


def violations(root: Path) -> list[str]:
    g = ig.build(root)
    out = [f"module cycle: {' -> '.join(c)}" for c in ig.module_cycles(g)]
    out += [f"part cycle: {' -> '.join(c)}" for c in ig.part_cycles(g)]
    for pkg in ("remote_payload", "ngp_train"):
        out += [f"{e.source}:{e.line} imports {e.target}" for e in ig.forbidden(g, pkg, ("orchestrator",))]
    out += [f"{e.source}:{e.line} imports {e.target} (only contracts)"
            for e in ig.forbidden(g, "orchestrator", ("ngp_train", "remote_payload"), allowed=SHARED_WITH_HOST)]
    out += [f"{e.source}:{e.line} imports {e.target} at import time"
            for e in ig.forbidden(g, "orchestrator", ("torch", "numpy", "pandas"), top_level_only=True,
                                  external=True)]
    out += [f"{e.source}:{e.line} imports {e.target} (providers never open SSH or write the ledger)"
            for e in ig.forbidden(g, "orchestrator.providers", ("orchestrator.transport", "orchestrator.ledger"),
                                  allowed=("orchestrator.transport.endpoint",))]
    return out


def test_the_tree_keeps_its_boundaries() -> None:
    assert violations(ROOT) == []


def test_every_controller_module_imports_without_torch() -> None:
    """Import every orchestrator module with torch (and ngp_train's heavy deps) unimportable."""
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        for name in ("torch", "numpy", "pandas", "PIL"):
            sys.modules[name] = None          # `import torch` now raises ImportError
        import orchestrator
        bad = []
        for m in pkgutil.walk_packages(orchestrator.__path__, "orchestrator."):
            if m.name.startswith("orchestrator.testing"):
                continue                      # test doubles may use the payload's libraries
            try:
                importlib.import_module(m.name)
            except ImportError as exc:
                bad.append(f"{m.name}: {exc}")
        print("\\n".join(bad))
        sys.exit(1 if bad else 0)
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    for pkg in ("orchestrator", "remote_payload", "ngp_train"):
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    return tmp_path


def test_a_planted_module_cycle_is_found(tmp_path: Path) -> None:
    root = _plant(tmp_path, {"orchestrator/a.py": "from . import b\n", "orchestrator/b.py": "def f():\n    from .a import x\n"})
    assert violations(root) == ["module cycle: orchestrator.a -> orchestrator.b",
                                "part cycle: orchestrator.a -> orchestrator.b"]


def test_a_cycle_through_a_package_init_is_found(tmp_path: Path) -> None:
    root = _plant(tmp_path, {"orchestrator/s/__init__.py": "from .m import g\n",
                             "orchestrator/s/m.py": "def g():\n    from . import helper\n"})
    assert violations(root) == ["module cycle: orchestrator.s -> orchestrator.s.m"]


def test_a_type_checking_import_is_not_a_cycle(tmp_path: Path) -> None:
    root = _plant(tmp_path, {"orchestrator/a.py": "from . import b\n",
                             "orchestrator/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n"})
    assert violations(root) == []


def test_a_part_cycle_between_folders_is_found(tmp_path: Path) -> None:
    root = _plant(tmp_path, {"orchestrator/p/__init__.py": "", "orchestrator/p/x.py": "from ..q import y\n",
                             "orchestrator/q/__init__.py": "", "orchestrator/q/y.py": "from ..p import z\n",
                             "orchestrator/p/z.py": ""})
    assert violations(root) == ["part cycle: orchestrator.p -> orchestrator.q"]


@pytest.mark.parametrize("files,expected", [
    ({"remote_payload/x.py": "import orchestrator.ledger\n"}, "remote_payload.x:1 imports orchestrator"),
    ({"ngp_train/t.py": "import torch\n", "orchestrator/r.py": "from ngp_train import t\n"},
     "orchestrator.r:1 imports ngp_train.t (only contracts)"),
    ({"orchestrator/h.py": "import torch\n"}, "orchestrator.h:1 imports torch at import time"),
    ({"orchestrator/providers/__init__.py": "", "orchestrator/ledger.py": "",
      "orchestrator/providers/v.py": "def f():\n    from ..ledger import Ledger\n"},
     "orchestrator.providers.v:2 imports orchestrator.ledger (providers never open SSH or write the ledger)"),
])
def test_each_forbidden_import_is_found(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    assert expected in violations(_plant(tmp_path, files))


def test_a_lazy_torch_import_inside_a_function_is_allowed(tmp_path: Path) -> None:
    root = _plant(tmp_path, {"orchestrator/h.py": "def f():\n    import torch\n"})
    assert violations(root) == []
