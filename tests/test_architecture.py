"""The one-way layers (pyproject's import-linter contract) hold, and the check really catches an
upward import: the same contract run on a copy of the package with one planted."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([str(LINT), "--config", str(cwd / "pyproject.toml"), "--no-cache"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_layers_contract_is_kept() -> None:
    r = _lint(ROOT, ROOT / "src")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "qwenkit layers KEPT" in r.stdout


def test_planted_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "src" / "qwenkit", tmp_path / "qwenkit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    layers = tmp_path / "qwenkit" / "model" / "layers.py"
    layers.write_text(layers.read_text() + "\nfrom qwenkit.engine import sampler  # planted\n")
    r = _lint(tmp_path, tmp_path)
    assert r.returncode != 0
    assert "qwenkit layers BROKEN" in r.stdout
    assert "qwenkit.model.layers -> qwenkit.engine.sampler" in r.stdout
