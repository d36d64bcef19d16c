"""Swap a built fp32 model's linears / embedding for quantized ones, in place.

The model code is unchanged (gpt-fast style): `Qwen2Attention.qkv_proj` simply becomes an
`Int8Linear` or `Int4Linear`. Modules are converted one at a time and the fp32 weight is dropped
right after; `quantize_while_loading` does it during the checkpoint load, so the whole fp32
model never exists.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

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
    if name.startswith("visual."):
        return None  # a vision-language model's vision encoder stays in float
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
    tied = _tied(model)
    for name, module in list(model.named_modules()):
        if role_of(name) is not None and not isinstance(module, (QuantizedLinear, Int8Embedding)):
            _quantize_module(model, name, module, policy, small_m, free_fp32 and not (tied and _is_table(name)))
    _share_tied_tables(model, policy, tied)
    model.quant_policy = policy  # type: ignore[assignment]
    logger.info("quantized model: %s", policy.spec)
    return model


def _tied(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def _is_table(name: str) -> bool:
    return role_of(name) in ("embed_tokens", "lm_head")


def _quantize_module(
    model: nn.Module, name: str, module: nn.Module, policy: QuantPolicy, small_m: int | None, free: bool
) -> None:
    """Swap `name` (a module with a role) for its quantized form; `free` drops its fp32 tensors."""
    role = role_of(name)
    fmt = policy.format_for(role)  # type: ignore[arg-type]
    if fmt == "none":
        return
    if role == "embed_tokens":
        assert isinstance(module, nn.Embedding)
        new: nn.Module = Int8Embedding.from_float(module)
    else:
        assert isinstance(module, nn.Linear), f"{name} is {type(module).__name__}"
        new = quantize_linear(module, fmt, small_m)
    _set_module(model, name, new)
    if free:  # free the fp32 weight now, not at the end
        for p in module.parameters(recurse=False):
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)  # also for holders of the Parameter
        module.to_empty(device="meta")


def quantize_while_loading(
    model: nn.Module,
    policy: QuantPolicy | str,
    weights: Iterator[tuple[str, torch.Tensor]],
    small_m: int | None = DEFAULT_SMALL_M,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass a checkpoint stream of (HF name, tensor) through to ``model.load_weights``, quantizing
    each module as soon as the last of its tensors has been loaded (and dropping its fp32
    weight), so the whole fp32 model never exists at once: peak memory is the quantized model
    plus what is in flight, not fp32 + quantized (peak RSS: docs/benchmarks.md). Any tensor order works;
    modules left over (a tied embedding/head, missing tensors) are for `quantize_model` after
    the load, which also records the policy."""
    if isinstance(policy, str):
        policy = parse(policy)
    mapping: dict[str, tuple[str, object]] = getattr(model, "packed_modules_mapping", {})
    tied = _tied(model)

    def owner(hf_name: str) -> str:  # "model.layers.0.self_attn.q_proj.weight" -> "...qkv_proj"
        if "." not in hf_name:
            return hf_name
        *path, leaf, _param = hf_name.split(".")
        return ".".join([*path, mapping[leaf][0] if leaf in mapping else leaf])

    pending: dict[str, set[str]] = {}
    for hf_name, _ in model.hf_state_dict():  # type: ignore[operator]
        mod = owner(hf_name)
        role = role_of(mod)
        if role is None or (tied and _is_table(mod)) or policy.format_for(role) == "none":
            continue  # not quantized, or left for quantize_model (tied tables)
        pending.setdefault(mod, set()).add(hf_name)
    with torch.no_grad():
        for hf_name, tensor in weights:
            yield hf_name, tensor  # the consumer copies it in before asking for the next one
            del tensor
            mod = owner(hf_name)
            left = pending.get(mod)
            if left is None:
                continue
            left.discard(hf_name)
            if not left:
                del pending[mod]
                _quantize_module(model, mod, model.get_submodule(mod), policy, small_m, True)


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
