"""benchmarks/ab/inprocess.py's export: a commit's engine packages renamed so that two versions
import side by side, every import of the old packages pointing at the renamed ones."""

from __future__ import annotations

import importlib
import re
import sys

from benchmarks.ab.inprocess import PACKAGES, export


def test_an_exported_commit_imports_beside_the_current_engine(tmp_path):
    export("HEAD", tmp_path / "old", "_old")
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["engine_daemon_old", "kernels_old"]
    stale = re.compile(r"^\s*(from|import) (" + "|".join(PACKAGES) + r")\b", re.M)
    leftovers = [str(p) for p in (tmp_path / "old").rglob("*.py") if stale.search(p.read_text())]
    assert not leftovers, f"imports of the unrenamed packages remain in {leftovers}"
    sys.path.insert(0, str(tmp_path / "old"))
    try:
        old = importlib.import_module("engine_daemon_old.engine")
        assert old.kernels_old.__name__ == "kernels_old" and old.EngineConfig.__module__ == "engine_daemon_old.config"
        import engine_daemon.engine as current

        assert old.Engine is not current.Engine
    finally:
        sys.path.remove(str(tmp_path / "old"))
        for name in [m for m in sys.modules if m.split(".")[0] in ("engine_daemon_old", "kernels_old")]:
            del sys.modules[name]
