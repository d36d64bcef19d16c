"""HF folder loader (config.json + *.safetensors [+ index]) and exporter."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from qwenkit.config import ModelConfig
from qwenkit.errors import ModelIntegrityError

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024**3


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelIntegrityError(f"{path}: invalid JSON ({e})") from None


def hf_config(folder: str | os.PathLike[str]) -> ModelConfig:
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not an HF model folder)")
    return ModelConfig.from_hf(read_json(path))


def generation_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / "generation_config.json"
    return read_json(path) if path.is_file() else {}


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ModelIntegrityError(f"{index}: lists missing shard(s) {[str(m) for m in missing]}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    return files


def iter_hf_weights(
    folder: str | os.PathLike[str], dtype: torch.dtype = torch.float32, progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    for path in safetensors_files(folder):
        try:
            f = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise ModelIntegrityError(f"{path}: unreadable safetensors file ({e})") from None
        keys = list(f.keys())
        for key in tqdm(keys, desc=f"loading {path.name}", disable=not progress or None, leave=False):
            try:
                t = f.get_tensor(key)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ModelIntegrityError(f"{path}: tensor {key!r}: {e}") from None
            yield key, t.to(dtype)


def export_hf(
    model: torch.nn.Module,
    out_dir: str | os.PathLike[str],
    tokenizer: Any | None = None,
    generation: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write an HF folder (safetensors shards + index, config.json, tokenizer, generation config).

    `model` must provide `.config` (ModelConfig) and `.hf_state_dict()` (HF-named tensors).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config: ModelConfig = model.config  # type: ignore[assignment]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in model.hf_state_dict():  # type: ignore[operator]
        t = t.detach().to(dtype).contiguous().clone()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(tqdm(shards, desc="writing shards", leave=False)):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            for k, v in shard.items():
                weight_map[k] = fname
                total += v.numel() * v.element_size()
        with open(out / SAFETENSORS_INDEX, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    write_hf_metadata(
        out, config, {"torch_dtype": str(dtype).removeprefix("torch.")}, tokenizer, generation
    )
    logger.info("exported %s to %s", config.name or "model", out)
    return out


def write_hf_metadata(
    out: Path,
    config: ModelConfig,
    config_extra: dict[str, Any],
    tokenizer: Any | None,
    generation: dict[str, Any] | None,
) -> None:
    """Write config.json (+ `config_extra`), generation_config.json and the tokenizer files."""
    hf_cfg = config.to_hf()
    hf_cfg.update(config_extra)
    with open(out / "config.json", "w") as f:
        json.dump(hf_cfg, f, indent=2)
    gen = {"bos_token_id": config.default_bos_token_id, "eos_token_id": list(config.eos_token_ids)}
    gen.update(generation or {})
    with open(out / "generation_config.json", "w") as f:
        json.dump(gen, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_hf(out)
