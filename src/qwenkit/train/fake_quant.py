"""Quantization-aware training: the student's weights seen through qwenkit's own quantizer.

`apply_fake_quant(model, policy)` makes every linear / embedding that `policy` (a
`qwenkit.quant` method or spec such as ``int4-all``) would quantize run on its *dequantized grid*
in the forward pass, computed with `qwenkit.quant.numerics`' own functions (int4: group-wise
asymmetric codes with the least-squares (scale, min) search and bf16-exact scales/zeros; int8:
per-row symmetric), so the grid is bit for bit the one `qwenkit.quant` builds from the same
weights. The backward pass is a straight-through estimator: the gradient of the grid is handed
to the fp32 master weight unchanged (d grid / d w := I).

The grid is recomputed from the master weights at every forward (full fine-tuning), so the
export is simply the master weights: loading them with the same ``-q`` method rebuilds exactly
the grid trained on. With LoRA the quantized weight is the *merged* one, Q(W + scale * B @ A),
the weight qwenkit runs (`--lora` merges an adapter before quantizing; `merge_lora` / `qwenkit
train merge` give the same folder); its gradient reaches A and B through the same STE. Frozen
modules (LoRA's head / embedding) keep a grid computed once.

Decisions mirror `qwenkit.quant.convert`: roles by module name, int4 falls back to int8 where a
fused layer's shape does not fit the group size (`int4_compatible`), a tied head and embedding
each get their own format from the one shared table.
"""
from __future__ import annotations

import logging
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.quant.convert import int4_compatible, role_of
from qwenkit.quant.numerics import _int4_codes, _int4_search, dequantize_int8, quantize_int8_per_channel
from qwenkit.quant.policy import QuantPolicy, parse

logger = logging.getLogger(__name__)

_ROWS = 2048  # rows quantized at once (as numerics does): bounded temporaries for a 151,936-row head


@torch.no_grad()
def quantize_dequantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w (N, K) -> fp32 (N, K) on qwenkit's `fmt` grid (``int8`` or ``int4-gG``), the values
    `Int8Linear` / `Int4Linear.from_float(...).dequantize()` hold, bit for bit."""
    w = w.detach().float()
    if fmt == "int8":
        return dequantize_int8(*quantize_int8_per_channel(w))
    if not fmt.startswith("int4-g"):
        raise ValueError(f"no fake quantization for format {fmt!r}")
    group = int(fmt.removeprefix("int4-g"))
    n, k = w.shape
    out = torch.empty(n, k, dtype=torch.float32, device=w.device)
    for lo in range(0, n, _ROWS):
        g = w[lo : lo + _ROWS].reshape(-1, k // group, group)
        s, z = _int4_search(g)  # the search `quantize_int4_groupwise` runs (search=True, its default)
        q = _int4_codes(g, s, z)
        # dequantize_int4's expression: (q - 8) * s + z
        out[lo : lo + _ROWS] = ((q - 8.0) * s[..., None] + z[..., None]).reshape(-1, k)
    return out


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, fmt: str) -> torch.Tensor:  # type: ignore[override]
        return quantize_dequantize(w, fmt).to(w.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def fake_quant(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """The grid of `w` in the forward pass, the identity in the backward pass (STE)."""
    return _StraightThrough.apply(w, fmt)


def linear_format(policy: QuantPolicy, role: str, out_features: int, in_features: int) -> str:
    """The format `qwenkit.quant.convert.quantize_linear` gives a (fused) linear of this role."""
    fmt = policy.format_for(role)
    if fmt.startswith("int4-g") and not int4_compatible(out_features, in_features, int(fmt.removeprefix("int4-g"))):
        return "int8"
    return fmt


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a (possibly fake-quantized) linear / embedding computes with."""
    fn = getattr(module, "fake_quant_weight", None)
    return fn() if fn is not None else module.weight


def _patch_linear(module: nn.Linear, fmt: str) -> None:
    """module(x) = x @ grid(W).T + b, through the STE; a frozen weight's grid is computed once."""
    frozen = not module.weight.requires_grad
    cache: list[torch.Tensor] = []

    def weight(self: nn.Linear) -> torch.Tensor:
        if frozen:
            if not cache:
                cache.append(quantize_dequantize(self.weight, fmt))
            return cache[0]
        return fake_quant(self.weight, fmt)

    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_quant_weight(), self.bias)

    module.fake_quant_weight = types.MethodType(weight, module)  # type: ignore[assignment]
    module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
    module.fake_quant_format = fmt  # type: ignore[assignment]


def _patch_lora(layer: nn.Module, fmt: str) -> None:
    """A peft `lora.Linear`: x @ grid(W + scale * B @ A).T + b (qwenkit's merge order)."""
    base = layer.base_layer
    adapter = layer.active_adapters[0]
    if len(layer.active_adapters) != 1 or not isinstance(layer.lora_dropout[adapter], nn.Identity):
        raise ValueError("fake quantization with LoRA needs one adapter and lora_dropout=0 (the merged weight is "
                         "what is quantized)")

    def weight(self: nn.Module) -> torch.Tensor:
        a = self.lora_A[adapter].weight
        b = self.lora_B[adapter].weight
        merged = base.weight.float() + (b.float() @ a.float()) * self.scaling[adapter]
        return fake_quant(merged, fmt)

    def forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return F.linear(x, self.fake_quant_weight(), base.bias)

    layer.fake_quant_weight = types.MethodType(weight, layer)
    layer.forward = types.MethodType(forward, layer)
    layer.fake_quant_format = fmt


def _patch_embedding(module: nn.Embedding, fmt: str) -> None:
    frozen = not module.weight.requires_grad
    cache: list[torch.Tensor] = []

    def weight(self: nn.Embedding) -> torch.Tensor:
        if frozen:
            if not cache:
                cache.append(quantize_dequantize(self.weight, fmt))
            return cache[0]
        return fake_quant(self.weight, fmt)

    def forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.fake_quant_weight())

    module.fake_quant_weight = types.MethodType(weight, module)  # type: ignore[assignment]
    module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
    module.fake_quant_format = fmt  # type: ignore[assignment]


def _patch_projection(module: nn.Module, fmt: str) -> None:
    if hasattr(module, "base_layer") and hasattr(module, "lora_A"):  # peft LoRA layer
        _patch_lora(module, fmt)
    elif isinstance(module, nn.Linear):
        _patch_linear(module, fmt)
    else:
        raise TypeError(f"cannot fake-quantize a {type(module).__name__}")


def apply_fake_quant(model: nn.Module, policy: QuantPolicy | str) -> dict[str, str]:
    """Patch `model` (a plain or LoRA-injected Qwen2ForCausalLM) in place; returns {module: format}."""
    from qwenkit.train.lora import SplitLinear

    if isinstance(policy, str):
        policy = parse(policy)
    done: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        role = role_of(name)
        if role is None or policy.format_for(role) == "none":
            continue
        if role == "embed_tokens":
            assert isinstance(module, nn.Embedding), name
            _patch_embedding(module, policy.embed_tokens)
            done[name] = policy.embed_tokens
            continue
        if isinstance(module, SplitLinear):  # LoRA's unfused q/k/v, gate/up: the fused layer's format
            fmt = linear_format(policy, role, sum(module.output_sizes), module.in_features)
            for shard in module.shard_names:
                _patch_projection(module.get_submodule(shard), fmt)
                done[f"{name}.{shard}"] = fmt
            continue
        base = getattr(module, "base_layer", module)
        fmt = linear_format(policy, role, base.out_features, base.in_features)
        _patch_projection(module, fmt)
        done[name] = fmt
    model.fake_quant_policy = policy  # type: ignore[assignment]
    logger.info("fake quantization (%s) on %d modules", policy.spec, len(done))
    return done
