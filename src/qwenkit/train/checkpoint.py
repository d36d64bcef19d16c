"""Checkpoints that resume exactly and serve as they are.

`OUT/checkpoint-000123/` holds the model as an HF folder (full fine-tuning: safetensors + config
+ tokenizer, which `qwenkit serve` loads) or a peft adapter (LoRA: adapter_config.json +
adapter_model.safetensors, served with `--lora`), and beside it the optimizer, the LR schedule,
every rank's RNG states and the data position (`trainer_state.json`), plus the run's
configuration. A checkpoint is written into a temporary folder and renamed when complete, so an
interrupted save never leaves a half checkpoint that `--resume auto` would pick.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step:06d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_resume(out: Path, resume: str | None) -> Path | None:
    """`resume`: None (start fresh), "auto" (the latest checkpoint in `out`, if any) or a folder."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a qwenkit checkpoint (no {STATE_FILE})")
    return path


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def begin(out: Path, step: int) -> Path:
    """A fresh temporary folder for checkpoint `step` (rank 0 creates it)."""
    tmp = out / f".tmp-checkpoint-{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(out: Path, step: int, tmp: Path, total_limit: int) -> Path:
    final = checkpoint_dir(out, step)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if total_limit > 0:
        for old in list_checkpoints(out)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("saved %s", final)
    return final


def write_state(folder: Path, state: dict[str, Any]) -> None:
    with open(folder / STATE_FILE, "w") as f:
        json.dump(state, f, indent=2, default=str)


def read_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable trainer state ({e})") from None
