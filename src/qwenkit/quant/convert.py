"""Swap a built fp32 model's linears / embedding for quantized ones, in place.

The model code is unchanged (gpt-fast style): `Qwen2Attention.qkv_proj` simply becomes an
`Int8Linear` or `Int4Linear`. Modules are converted one at a time and the fp32 weight is dropped
right after, so peak memory is the fp32 model plus one quantized module.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from qwenkit.quant.embedding import Int8Embedding
from qwenkit.quant.linear import DEFAULT_SMALL_M, Int4Linear, Int8Linear, QuantizedLinear
from qwenkit.quant.policy import LINEAR_ROLES, QuantPolicy, parse

logger = logging.getLogger(__name__)


def quantize_linear(linear: nn.Linear, fmt: str, small_m: int | None = DEFAULT_SMALL_M) -> nn.Module:
    if fmt == "none":
        return linear
    if fmt == "int8":
        return Int8Linear.from_float(linear, small_m=small_m)
    if fmt.startswith("int4-g"):
        group = int(fmt.removeprefix("int4-g"))
        if not int4_compatible(linear.out_features, linear.in_features, group):
            logger.warning(
                "int4 (group %d) needs in_features %% group == 0 and out_features %% 32 == 0; "
                "%dx%d falls back to int8", group, linear.out_features, linear.in_features,
            )  # fmt: skip
            return Int8Linear.from_float(linear, small_m=small_m)
        return Int4Linear.from_float(linear, group, small_m=small_m)
    raise ValueError(f"unknown linear format {fmt!r}")


def int4_compatible(out_features: int, in_features: int, group_size: int) -> bool:
    return in_features % group_size == 0 and out_features % 32 == 0


def role_of(name: str) -> str | None:
    """Module path -> role (``model.layers.3.mlp.down_proj`` -> ``down_proj``)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in LINEAR_ROLES or name == "lm_head":
        return leaf
    if name.endswith("embed_tokens"):
        return "embed_tokens"
    return None


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    policy: QuantPolicy | str,
    small_m: int | None = DEFAULT_SMALL_M,
    free_fp32: bool = True,
) -> nn.Module:
    """Quantize `model` in place according to `policy`; returns it, with `model.quant_policy` set.

    `free_fp32=False` leaves the replaced fp32 tensors alone (they may be shared with another
    model, see `qwenkit.quant.quality.quantized_view`)."""
    if isinstance(policy, str):
        policy = parse(policy)
    bad = {p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32}
    if bad and policy.is_quantized:
        raise ValueError(
            f"quantized models run with fp32 activations; load the model in float32 (got {bad})"
        )
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for name, module in list(model.named_modules()):
        role = role_of(name)
        if role is None or isinstance(module, (QuantizedLinear, Int8Embedding)):
            continue
        fmt = policy.format_for(role)
        if fmt == "none":
            continue
        if role == "embed_tokens":
            assert isinstance(module, nn.Embedding)
            new: nn.Module = Int8Embedding.from_float(module)
        else:
            assert isinstance(module, nn.Linear), f"{name} is {type(module).__name__}"
            new = quantize_linear(module, fmt, small_m)
        _set_module(model, name, new)
        if free_fp32 and not (tied and role in ("embed_tokens", "lm_head")):
            module.to_empty(device="meta")  # free the fp32 weight now, not at the end
    _share_tied_tables(model, policy, tied)
    model.quant_policy = policy  # type: ignore[assignment]
    logger.info("quantized model: %s", policy.spec)
    return model


def _share_tied_tables(model: nn.Module, policy: QuantPolicy, tied: bool) -> None:
    """Tied head + int8 head + int8 embedding: one int8 table, not two."""
    if not (tied and policy.lm_head == "int8" and policy.embed_tokens == "int8"):
        return
    head = model.get_submodule("lm_head")
    emb_name = next(n for n, _ in model.named_modules() if n.endswith("embed_tokens"))
    assert isinstance(head, Int8Linear)
    _set_module(model, emb_name, Int8Embedding(head.qweight, head.scales, head.tile_rows))


def small_m_of(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            return m.small_m
    return None


def set_small_m(model: nn.Module, small_m: int) -> None:
    """Change the decode/prefill kernel crossover of every quantized linear."""
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.small_m = small_m


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
