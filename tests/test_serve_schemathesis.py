"""Schemathesis fuzzes every operation of the served OpenAPI spec against `qwenkit serve` on a
tiny random model: no response is a 5xx.

Two bounded runs: the coverage phase in negative mode (boundary and invalid values of every
field, ~1,100 cases) and the fuzzing phase (valid and invalid, 20 examples per operation). A
short context (48 tokens) keeps each generation to a few tokens; the whole test takes about a
minute.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.serve_utils import ServerProcess, tiny_model_dir

pytestmark = pytest.mark.slow
pytest.importorskip("schemathesis")

API_KEY = "fuzz-key"


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, gguf_05b_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model = tiny_model_dir(request.config, gguf_05b_path)
    srv = ServerProcess(
        model, "--threads", "1", "--max-model-len", "48", "--api-key", API_KEY,
        log_path=tmp_path_factory.mktemp("fuzz") / "server.log",
    )  # fmt: skip
    try:
        srv.wait_ready(timeout=300)
        yield srv
    finally:
        srv.stop()


def run_schemathesis(server: ServerProcess, cwd: Path, *args: str) -> str:
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
        "--checks", "not_a_server_error", "-H", f"Authorization: Bearer {API_KEY}", "--workers", "2",
        "--seed", "1", "--generation-database", "none", "--request-timeout", "120", "--no-color", *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)
    report = proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    assert proc.returncode == 0 and summary and summary[1] == summary[2], report
    return proc.stdout


def test_no_server_errors(server: ServerProcess, tmp_path: Path) -> None:
    # Boundary and invalid values for every field (fast: nearly all are rejected with a 4xx) ...
    run_schemathesis(server, tmp_path, "--phases", "coverage", "--mode", "negative")
    # ... then random valid and invalid requests, which do run generations.
    run_schemathesis(server, tmp_path, "--phases", "fuzzing", "--max-examples", "20")
    statuses = [
        json.loads(line.split("access: ", 1)[1])["status"]
        for line in server.log_path.read_text(errors="replace").splitlines()
        if "qwenkit.serve.access" in line and '"path": "/ready"' not in line  # startup polling
    ]
    assert len(statuses) > 800, "schemathesis sent fewer requests than expected"
    assert sum(s == 200 for s in statuses) > 20, "too few valid requests reached the engine"
    assert not [s for s in statuses if s >= 500]
    assert "Traceback" not in server.log_path.read_text(errors="replace")
