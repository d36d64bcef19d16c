"""LoRA adapters in peft's format, read and merged into our model without peft.

An adapter folder holds `adapter_config.json` (r, lora_alpha, use_rslora, target_modules, ...)
and `adapter_model.safetensors` with ``base_model.model.<HF module>.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r) per adapted linear. Merging adds ``scale * B @ A`` to the linear's
weight, scale = alpha / r (alpha / sqrt(r) with rsLoRA). Fused projections (q/k/v, gate/up) take
their delta in their shard's rows. Only plain LoRA is supported: DoRA, per-module rank or alpha
patterns, LoRA biases and `modules_to_save` are refused with an error naming the field.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenkit.errors import AdapterError
from qwenkit.loaders.hf import read_json
from qwenkit.model.layers import MergedLinear

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight")


@dataclass
class LoraAdapter:
    """A parsed adapter: `weights` maps HF module names (``model.layers.0.self_attn.q_proj``)
    to (A (r, in), B (out, r))."""

    path: Path
    r: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    base_model_name_or_path: str | None = None
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def _targets(path: Path, value: Any) -> tuple[str, ...] | str:
    if isinstance(value, str) and value:
        return value  # peft: a regex matched against the whole module name
    if isinstance(value, list) and value and all(isinstance(t, str) and t for t in value):
        return tuple(value)
    raise AdapterError(f"{path}: 'target_modules' must be a non-empty list of module names or a regex, got {value!r}")


def _is_target(module: str, targets: tuple[str, ...] | str) -> bool:
    """peft's rule: a regex must match the whole name; a list entry matches the name's tail."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterError(f"{path.parent}: no {ADAPTER_CONFIG} (not a LoRA adapter folder)")
    try:
        cfg = read_json(path)
    except Exception as e:  # ModelIntegrityError (bad JSON) or an unreadable file
        raise AdapterError(f"{path}: unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{path}: 'peft_type' is {peft_type!r}; only LORA adapters are supported")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"{path}: 'r' must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"{path}: 'lora_alpha' must be a positive number, got {alpha!r}")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterError(f"{path}: 'use_rslora' must be true or false, got {rslora!r}")
    unsupported = {
        "use_dora": "DoRA",
        "rank_pattern": "per-module ranks",
        "alpha_pattern": "per-module alphas",
        "modules_to_save": "fully trained modules",
        "lora_bias": "LoRA biases",
        "fan_in_fan_out": "fan_in_fan_out",
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise AdapterError(f"{path}: {key!r} is set ({what} are not supported by the merge)")
    if cfg.get("bias", "none") not in ("none", None):
        raise AdapterError(f"{path}: 'bias' is {cfg['bias']!r}; only 'none' is supported")
    return cfg


def _read_weights(path: Path, r: int, targets: tuple[str, ...] | str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise AdapterError(f"{path.parent}: no {ADAPTER_WEIGHTS}")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                m = _KEY.fullmatch(key)
                if m is None:
                    raise AdapterError(
                        f"{path}: unsupported tensor {key!r} (expected base_model.model.<module>.lora_A/B.weight)"
                    )
                t = f.get_tensor(key)
                want_r_dim = 0 if m["which"] == "A" else 1
                if t.dim() != 2 or t.shape[want_r_dim] != r:
                    raise AdapterError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, not rank r={r}")
                if not _is_target(m["module"], targets):
                    raise AdapterError(f"{path}: tensor {key!r} is for a module not in target_modules {targets!r}")
                halves.setdefault(m["module"], {})[m["which"]] = t
    except (SafetensorError, OSError, RuntimeError) as e:
        raise AdapterError(f"{path}: unreadable safetensors file ({e})") from None
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in halves.items():
        missing = {"A", "B"} - set(ab)
        if missing:
            raise AdapterError(f"{path}: base_model.model.{module}.lora_{missing.pop()}.weight is missing")
        weights[module] = (ab["A"], ab["B"])
    if not weights:
        raise AdapterError(f"{path}: no LoRA tensors")
    return weights


def read_adapter(path: str | os.PathLike[str]) -> LoraAdapter:
    """Read and validate a peft LoRA adapter folder (raises `AdapterError` naming file and key)."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: LoRA adapter folder not found")
    cfg_path = folder / ADAPTER_CONFIG
    cfg = _read_config(cfg_path)
    targets = _targets(cfg_path, cfg.get("target_modules"))
    weights = _read_weights(folder / ADAPTER_WEIGHTS, cfg["r"], targets)
    return LoraAdapter(
        path=folder,
        r=cfg["r"],
        alpha=float(cfg["lora_alpha"]),
        use_rslora=cfg.get("use_rslora", False),
        target_modules=targets,
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
        weights=weights,
    )


def _target_rows(model: nn.Module, modules: dict[str, nn.Module], name: str) -> tuple[nn.Linear, slice]:
    """The linear holding HF module `name` and the rows of its weight that are `name`'s."""
    *path, leaf = name.split(".")
    packed: dict[str, tuple[str, str]] = getattr(model, "packed_modules_mapping", {})
    if leaf in packed:
        fused, shard = packed[leaf]
        module = modules.get(".".join([*path, fused]))
        if type(module) is MergedLinear:
            return module, module.shard_slice(shard)
    else:
        module = modules.get(name)
        if type(module) is nn.Linear:
            if name == "lm_head" and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
                raise AdapterError("an adapter on lm_head cannot be merged into a model with tied embeddings")
            return module, slice(None)
    if module is None:
        raise KeyError(name)
    raise TypeError(f"{type(module).__name__} (merge adapters before quantizing)")


@torch.no_grad()
def merge_adapter_into(model: nn.Module, adapter: LoraAdapter) -> int:
    """W += scale * B @ A for every adapted projection of our (unquantized) model, found by
    HF name; fused q/k/v and gate/up take it in their shard's rows. Returns the count merged."""
    modules = dict(model.named_modules())
    weights_file = adapter.path / ADAPTER_WEIGHTS
    for name, (a, b) in adapter.weights.items():
        key = f"base_model.model.{name}.lora_A.weight"
        try:
            linear, rows = _target_rows(model, modules, name)
        except KeyError:
            raise AdapterError(f"{weights_file}: {key!r}: the model has no module {name!r}") from None
        except TypeError as e:
            raise AdapterError(f"{weights_file}: {key!r}: cannot merge into {e}") from None
        target = linear.weight.data[rows]
        delta = (b.float() @ a.float()) * adapter.scale
        if delta.shape != target.shape:
            raise AdapterError(
                f"{weights_file}: {key!r}: B @ A has shape {tuple(delta.shape)}, the model's {name} "
                f"weight {tuple(target.shape)} (adapter for another model?)"
            )
        if target.dtype == torch.float32:
            target.add_(delta.to(target.device))
        else:  # add in fp32, round once
            target.copy_(target.float() + delta.to(target.device))
    logger.info(
        "merged LoRA adapter %s (r=%d, scale %.4g) into %d projections",
        adapter.path, adapter.r, adapter.scale, len(adapter.weights),
    )  # fmt: skip
    return len(adapter.weights)
