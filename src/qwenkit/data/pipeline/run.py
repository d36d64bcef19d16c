"""Running datatrove jobs: the executor (local processes or a Ray cluster), resumption, and the
kept / dropped counts by reason read back from every task's stats."""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ExecutorConfig", "job_counts", "run_job"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecutorConfig:
    """``executor``: ``local`` (processes on this machine) or ``ray`` (``address`` of a running
    cluster, ``None`` = start a local Ray instance); ``workers``: tasks run at once (-1 = all)."""

    executor: str = "local"
    workers: int = 1
    address: str | None = None
    cpus_per_task: int = 1

    def __post_init__(self) -> None:
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be 'local' or 'ray', got {self.executor!r}")
        if self.workers == 0 or self.workers < -1:
            raise ValueError(f"workers must be >= 1 or -1 (all tasks at once), got {self.workers}")


def _ray_init(address: str | None) -> None:
    try:
        import ray
    except ImportError:
        raise RuntimeError("--executor ray needs the ray package (pip install 'ray>=2.9')") from None
    if not ray.is_initialized():
        kw: dict[str, Any] = {"address": address} if address else {}
        # workers import qwenkit from the same source tree as the driver
        src = str(Path(__file__).resolve().parents[3])
        env = {"PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}
        ray.init(runtime_env={"env_vars": env}, log_to_driver=False, **kw)


def run_job(pipeline: list[Any], tasks: int, logging_dir: str | os.PathLike[str], cfg: ExecutorConfig) -> float:
    """Run ``pipeline`` as ``tasks`` tasks; tasks already completed under ``logging_dir`` (datatrove's
    completion markers) are skipped. Returns the wall time in seconds."""
    t0 = time.perf_counter()
    tasks = max(1, int(tasks))
    if cfg.executor == "ray":
        from datatrove.executor import RayPipelineExecutor

        _ray_init(cfg.address)
        ex: Any = RayPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=cfg.workers,
                                      logging_dir=str(logging_dir), cpus_per_task=cfg.cpus_per_task)  # fmt: skip
    else:
        from datatrove.executor import LocalPipelineExecutor

        ex = LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(cfg.workers, tasks) if cfg.workers > 0
                                   else tasks, logging_dir=str(logging_dir), start_method="spawn")  # fmt: skip
    ex.run()
    incomplete = ex.get_incomplete_ranks(range(tasks))
    if incomplete:
        raise RuntimeError(f"{len(incomplete)} of {tasks} tasks did not complete; see the logs under {logging_dir}")
    return time.perf_counter() - t0


def _total(v: Any) -> float:
    if isinstance(v, dict):
        return v.get("total", 0)
    return v or 0


def job_counts(logging_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Per pipeline step (in order), every counter summed over all tasks' ``stats/<rank>.json``
    (also those completed by an earlier run): ``{"name": ..., "counts": {...}, "time_s": ...}``."""
    folder = Path(logging_dir) / "stats"
    steps: list[dict[str, Any]] = []
    for f in sorted(folder.glob("*.json")):
        for i, st in enumerate(json.loads(f.read_text())):
            if i == len(steps):
                steps.append({"name": st["name"], "counts": Counter(), "time_s": 0.0})
            steps[i]["counts"].update({k: _total(v) for k, v in st["stats"].items()})
            steps[i]["time_s"] += float(_total(st.get("time_stats", {})))
    for s in steps:
        s["counts"] = {k: (int(v) if float(v).is_integer() else v) for k, v in sorted(s["counts"].items())}
    return steps
