"""Quantized checkpoints: an HF-style folder whose safetensors hold the quantized tensors.

Layout of ``DIR``:
- ``config.json``: the HF config plus ``quantization_config``::

      {"quant_method": "qwenkit", "version": 1, "spec": "qkv_proj=int4-g32,...",
       "modules": {"qkv_proj": "int4-g32", ..., "embed_tokens": "int8"}}

- ``model.safetensors``: HF tensor names, fused projections split back into their HF rows
  (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``). Per quantized projection:
  int8 -> ``<name>.qweight`` int8 (N, K) + ``<name>.scales`` bf16 (N,);
  int4 -> ``<name>.qweight`` uint8 (N, K/2) (low nibble = even column) + ``<name>.scales`` /
  ``<name>.zeros`` bf16 (N, K/g). Unquantized tensors keep their fp32 ``.weight`` / ``.bias``.
- tokenizer files and ``generation_config.json`` as in `qwenkit export`.

The canonical layout is kernel-independent; loading repacks it for the device's kernel (a
permutation, not a re-quantization: codes and scales are read back bit-exactly).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from safetensors.torch import load_file, save_file

from qwenkit.config import ModelConfig
from qwenkit.errors import ModelIntegrityError
from qwenkit.loaders.hf import safetensors_files, write_hf_metadata
from qwenkit.model import causal_lm_class
from qwenkit.quant.convert import role_of
from qwenkit.quant.embedding import Int8Embedding
from qwenkit.quant.linear import DEFAULT_SMALL_M, Int4Linear, Int8Linear, QuantizedLinear
from qwenkit.quant.policy import QuantPolicy

logger = logging.getLogger(__name__)

QUANT_METHOD = "qwenkit"
FORMAT_VERSION = 1


def quantization_config(policy: QuantPolicy) -> dict[str, Any]:
    return {
        "quant_method": QUANT_METHOD,
        "version": FORMAT_VERSION,
        "spec": policy.spec,
        "modules": policy.as_dict(),
    }


def read_quantization_config(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        qc = json.load(f).get("quantization_config")
    if qc is None:
        return None
    if qc.get("quant_method") != QUANT_METHOD:
        raise ModelIntegrityError(
            f"{path}: quantization_config.quant_method {qc.get('quant_method')!r} is not supported "
            f"(only {QUANT_METHOD!r} checkpoints written by `qwenkit quantize`)"
        )
    return qc


# ------------------------------------------------------------------------------------- save
def _split_rows(module: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield HF-named tensors; a fused module's rows are split back into its HF projections."""
    names = getattr(module, "shard_names", None)
    if not names:
        for key, t in tensors.items():
            yield f"{name}.{key}", t
        return
    parent = name.rsplit(".", 1)[0]
    sizes = module.output_sizes
    for key, t in tensors.items():
        for shard, part in zip(names, t.split(list(sizes), dim=0)):
            yield f"{parent}.{shard}.{key}", part


def head_shares_embedding(config: ModelConfig, policy: QuantPolicy) -> bool:
    """A tied head is stored once (as the embedding) when both use the same table format."""
    return config.tie_word_embeddings and policy.lm_head == policy.embed_tokens in ("none", "int8")


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    shared = head_shares_embedding(model.config, model.quant_policy)
    for name, module in model.named_modules():
        if role_of(name) is None:
            continue
        if shared and name == "lm_head":
            continue  # the tie is restored at load
        if isinstance(module, (QuantizedLinear, Int8Embedding)):
            tensors = dict(module.canonical_state())
        else:
            tensors = {"weight": module.weight.detach()}
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            tensors["bias"] = bias.detach().float()
        for key, t in _split_rows(module, name, tensors):
            out[key] = t.contiguous().cpu().clone()
    for name, p in model.named_parameters():
        module_name = name.rsplit(".", 1)[0]
        if role_of(module_name) is None:  # norms
            out[name] = p.detach().float().cpu().clone()
    return out


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    tokenizer: Any | None = None,
    generation: dict[str, Any] | None = None,
) -> Path:


    policy: QuantPolicy | None = getattr(model, "quant_policy", None)
    if policy is None:
        raise ValueError("model is not quantized (call qwenkit.quant.quantize_model first)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config: ModelConfig = model.config
    save_file(quantized_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    write_hf_metadata(
        out, config, {"quantization_config": quantization_config(policy)}, tokenizer, generation
    )
    logger.info("wrote quantized checkpoint (%s) to %s", policy.spec, out)
    return out


# ------------------------------------------------------------------------------------- load
def _gather(
    tensors: dict[str, torch.Tensor], module: nn.Module, name: str, key: str
) -> torch.Tensor | None:
    """The checkpoint tensor `key` of module `name`, re-fusing split projections."""
    names = getattr(module, "shard_names", None)
    if not names:
        return tensors.get(f"{name}.{key}")
    parent = name.rsplit(".", 1)[0]
    parts = [tensors.get(f"{parent}.{s}.{key}") for s in names]
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise ModelIntegrityError(f"checkpoint has only some shards of {name}.{key}")
    return torch.cat(parts, dim=0)  # type: ignore[arg-type]


def _need(t: torch.Tensor | None, what: str) -> torch.Tensor:
    if t is None:
        raise ModelIntegrityError(f"quantized checkpoint is missing tensor {what!r}")
    return t


def _materialize(module: nn.Module, name: str, value: torch.Tensor, device: torch.device | str) -> None:
    module._parameters[name] = nn.Parameter(value.to(device=device, dtype=torch.float32), requires_grad=False)


def build_quantized_model(
    config: ModelConfig,
    policy: QuantPolicy,
    tensors: dict[str, torch.Tensor],
    device: torch.device | str = "cpu",
    small_m: int | None = DEFAULT_SMALL_M,
) -> nn.Module:
    """Construct the model on the meta device and fill it from checkpoint tensors, never
    allocating fp32 copies of the quantized weights."""

    with torch.device("meta"):
        model = causal_lm_class(config)(config)
    used: set[str] = set()
    tensors = dict(tensors)
    shared = head_shares_embedding(config, policy)

    def take(module: nn.Module, name: str, key: str) -> torch.Tensor | None:
        t = _gather(tensors, module, name, key)
        if t is not None:
            names = getattr(module, "shard_names", None)
            parent = name.rsplit(".", 1)[0]
            used.update([f"{parent}.{s}.{key}" for s in names] if names else [f"{name}.{key}"])
        return None if t is None else t.to(device)

    for name, module in list(model.named_modules()):
        role = role_of(name)
        if role is None:
            continue
        if shared and name == "lm_head":
            continue
        fmt = policy.format_for(role)
        bias = take(module, name, "bias")
        meta = {"output_sizes": module.output_sizes, "shard_names": module.shard_names} if hasattr(module, "shard_names") else {}
        if fmt == "none":
            _materialize(module, "weight", _need(take(module, name, "weight"), f"{name}.weight"), device)
            if bias is not None:
                _materialize(module, "bias", bias, device)
            continue
        q = _need(take(module, name, "qweight"), f"{name}.qweight")
        s = _need(take(module, name, "scales"), f"{name}.scales").float()
        z = take(module, name, "zeros")  # present = int4 (a policy's int4 may fall back to int8)
        new: nn.Module
        if role == "embed_tokens":
            new = Int8Embedding(q, s)
        elif z is None:
            new = Int8Linear(q, s, bias, small_m=small_m, **meta)
        else:
            group = 2 * q.shape[1] // s.shape[1]
            new = Int4Linear(q, s, z.float(), group, bias, small_m=small_m, **meta)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    for name, p in list(model.named_parameters()):
        if p.device.type != "meta" or (shared and name.startswith("lm_head.")):
            continue
        module_name, leaf = name.rsplit(".", 1)
        _materialize(model.get_submodule(module_name), leaf, _need(tensors.get(name), name), device)
        used.add(name)
    if shared:
        _restore_tie(model)
    unused = set(tensors) - used
    if unused:
        raise ModelIntegrityError(f"quantized checkpoint has unexpected tensors {sorted(unused)[:8]}")
    model.quant_policy = policy  # type: ignore[assignment]
    return model.eval()


def _restore_tie(model: nn.Module) -> None:
    emb = model.model.embed_tokens
    if isinstance(emb, Int8Embedding):
        head = model.lm_head = Int8Linear(emb.qweight, emb.scales)
        model.model.embed_tokens = Int8Embedding(head.qweight, head.scales, head.tile_rows)  # one table
    else:
        model.lm_head.weight = emb.weight


def load_quantized(
    folder: str | os.PathLike[str],
    config: ModelConfig,
    device: torch.device | str = "cpu",
    small_m: int | None = DEFAULT_SMALL_M,
) -> nn.Module:


    qc = read_quantization_config(folder)
    if qc is None:
        raise ModelIntegrityError(f"{folder}: config.json has no quantization_config")
    if int(qc.get("version", 0)) != FORMAT_VERSION:
        raise ModelIntegrityError(f"{folder}: quantized checkpoint version {qc.get('version')} != {FORMAT_VERSION}")
    policy = QuantPolicy.from_dict(qc["modules"])
    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors_files(Path(folder)):
        tensors.update(load_file(str(path)))
    return build_quantized_model(config, policy, tensors, device, small_m)
