"""The decoder layers of a decode step as one C call (`csrc/decode_step.c`).

When every linear of the model's layers runs qwenkit's int8-activation kernels (int8 or int4
weights, `qwenkit.quant`), a decode step of up to `max_rows` single-query rows, all cached keys
visible, can run the whole layer stack in C: the same kernels in the same order as the per-op
path (RMSNorm, quantized linears with their bias, RoPE, the cache write, decode attention,
SiLU·mul, residual adds), so the hidden states are bit-identical, without ~12 Python module
calls and ctypes crossings per layer.

`run(model, h, rope, attn_metadata)` is called by `Qwen2Model.forward`; it returns None (and
the model runs its modules) unless all of these hold: the C library is built, the tensors are
CPU fp32 without autograd, every layer linear has the C-kernel layout, the row count fits the
linears' small-M kernel, and the attention backend offers a `decode_kv(window)` view of the
step (`DecodeKV`: one query per row, every key visible). The model knows only that protocol,
not the engine. ``QWENKIT_CKERNELS=0`` disables it with the other C kernels.
"""
from __future__ import annotations

import ctypes
import functools
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from qwenkit.cpu import build, ops

_P = ctypes.c_void_p
_I = ctypes.c_int64


class _Linear(ctypes.Structure):
    _fields_ = [
        ("kind", _I), ("N", _I), ("K", _I), ("group_size", _I),
        ("w", _P), ("s", _P), ("sc", _P), ("z", _P), ("bias", _P),
    ]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [("ln1", _P), ("ln2", _P), ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear)]


class _Model(ctypes.Structure):
    _fields_ = [
        ("n_layers", _I), ("H", _I), ("Hq", _I), ("Hkv", _I), ("D", _I), ("I", _I),
        ("eps", ctypes.c_float), ("scale", ctypes.c_float),
        ("layers", ctypes.POINTER(_Layer)), ("norm", _P),
    ]  # fmt: skip


@dataclass
class DecodeKV:
    """What the attention backend hands the fused step: one row per sequence, each with one
    new token whose query sees every cached key of its sequence (the new one included)."""

    k_cache: Sequence[torch.Tensor]  # per layer (blocks, block_size, Hkv, D) fp32, contiguous
    v_cache: Sequence[torch.Tensor]
    slots: torch.Tensor  # (M,) int64: block * block_size + offset of each row's new key
    block_tables: torch.Tensor  # (M, max_blocks) int64, contiguous
    context_lens: torch.Tensor  # (M,) int64: cached keys after this step


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    lib = build.lib()
    if lib is None:
        return None
    lib.qk_decode_layers.argtypes = [ctypes.POINTER(_Model), _P, _I, _P, _P, _P, _P, _P, _P, _I, _P, _I, _P]
    lib.qk_decode_layers.restype = None
    lib.qk_decode_scratch_floats.argtypes = [ctypes.POINTER(_Model), _I]
    lib.qk_decode_scratch_floats.restype = _I
    return lib


def _linear_desc(lin: nn.Module) -> tuple[_Linear, int, torch.Tensor] | None:
    """The C descriptor of a quantized linear whose small-M path is qwenkit's int8-activation
    kernel, its small-M limit, and its primary storage (to detect swaps); else None."""
    from qwenkit.quant.linear import Int4Linear, Int8Linear

    bias = lin.bias.data_ptr() if getattr(lin, "bias", None) is not None else None
    if isinstance(lin, Int8Linear) and lin.tile_rows:  # the int8 kernel's tiled layout
        d = _Linear(1, lin.out_features, lin.in_features, 0, lin.qweight.data_ptr(), lin.scales.data_ptr(), None, None, bias)
        return d, lin.small_m, lin.qweight
    if isinstance(lin, Int4Linear) and lin._block_layout:
        d = _Linear(
            2, lin.out_features, lin.in_features, lin.group_size, lin.codes.data_ptr(), None,
            lin.scales.data_ptr(), lin.zeros.data_ptr(), bias,
        )  # fmt: skip
        return d, lin.small_m, lin.codes
    return None


class _Plan:
    """The model's layer stack as C descriptors, built once per model (and rebuilt if a module
    or its storage is replaced)."""

    def __init__(self, model: nn.Module) -> None:
        layers = list(model.layers)
        first = layers[0].self_attn
        self.mods = _layer_linears(model)
        self.ptrs: list[int] = []
        self.struct_layers = (_Layer * len(layers))()
        self.max_rows = 1 << 30
        self.scratch = torch.empty(0)
        self.ok = first.head_dim in ops.ATTN_HEAD_DIMS
        norms = [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        norms.append(model.norm)
        self.ok = self.ok and all(n.weight.dtype == torch.float32 and n.weight.is_cpu for n in norms)
        descs = [_linear_desc(m) for m in self.mods] if self.ok else [None]
        if any(d is None for d in descs):
            self.ok = False
            return
        for i, layer in enumerate(layers):
            d = descs[4 * i : 4 * i + 4]
            self.struct_layers[i] = _Layer(
                layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                *(x[0] for x in d),
            )  # fmt: skip
        self.max_rows = min(x[1] for x in descs)  # type: ignore[index]
        self.ptrs = [x[2].data_ptr() for x in descs]  # type: ignore[index]
        self.windows = [layer.self_attn.sliding_window for layer in layers]
        self.norms = norms  # keep the weights alive with the plan
        self.model = _Model(
            len(layers), model.norm.weight.numel(), first.num_heads, first.num_kv_heads, first.head_dim,
            layers[0].mlp.intermediate_size, layers[0].input_layernorm.eps, first.scale,
            self.struct_layers, model.norm.weight.data_ptr(),
        )  # fmt: skip

    def current(self, model: nn.Module) -> bool:
        mods = _layer_linears(model)
        if len(mods) != len(self.mods) or not all(a is b for a, b in zip(mods, self.mods)):
            return False
        return not self.ok or all(_storage(m).data_ptr() == p for m, p in zip(mods, self.ptrs))


def _layer_linears(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for layer in model.layers
        for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
    ]


def _storage(m: nn.Module) -> torch.Tensor:
    return m.qweight if hasattr(m, "qweight") else m.codes


_plans: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()


def plan_for(model: nn.Module) -> _Plan | None:
    """The model's plan when its layers can run as one C call, else None."""
    if _lib() is None:
        return None
    plan = _plans.get(model)
    if plan is None or not plan.current(model):
        plan = _plans[model] = _Plan(model)
    return plan if plan.ok else None


def run(
    model: nn.Module, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn_metadata: Any
) -> torch.Tensor | None:
    """h (B, T, hidden) embeddings -> the final-normed hidden states (B, T, hidden), or None when
    the fused step does not apply (the caller then runs the modules)."""
    decode_kv = getattr(attn_metadata, "decode_kv", None)
    if decode_kv is None or not ops.enabled(h):
        return None
    rows = h.shape[0] * h.shape[1]
    plan = plan_for(model)
    if plan is None or rows > plan.max_rows:
        return None
    windows = [w for w in plan.windows if w is not None]
    kv = decode_kv(min(windows) if windows else None)
    if kv is None or kv.slots.numel() != rows:
        return None
    lib = _lib()
    cos, sin = (t.reshape(rows, -1).contiguous() for t in rope)
    x = h.reshape(rows, -1).contiguous()
    need = lib.qk_decode_scratch_floats(ctypes.byref(plan.model), rows)
    if plan.scratch.numel() < need:
        plan.scratch = torch.empty(need, dtype=torch.float32)
    n_layers = plan.model.n_layers
    k_ptrs = (ctypes.c_void_p * n_layers)(*(t.data_ptr() for t in kv.k_cache))
    v_ptrs = (ctypes.c_void_p * n_layers)(*(t.data_ptr() for t in kv.v_cache))
    tables, ctx, slots = kv.block_tables, kv.context_lens, kv.slots
    lib.qk_decode_layers(
        ctypes.byref(plan.model), x.data_ptr(), rows, cos.data_ptr(), sin.data_ptr(), k_ptrs, v_ptrs,
        slots.data_ptr(), tables.data_ptr(), tables.shape[1], ctx.data_ptr(), kv.k_cache[0].shape[1],
        plan.scratch.data_ptr(),
    )  # fmt: skip
    return x.view(h.shape)


def decode_kv_ok(k_cache: Sequence[torch.Tensor]) -> bool:
    """Whether a cache's per-layer pools have the layout the fused step reads."""
    t = k_cache[0]
    return t.dtype == torch.float32 and t.is_cpu and t.is_contiguous()
