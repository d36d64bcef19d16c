"""The decoder layers of a decode step as one C call (`csrc/decode_step.c`).

`FusedQwen2Model` (swapped in by `qwenkit.cpu.install`) asks `run` first in every forward; `run`
returns None and the model runs its modules unless a plan applies. A plan is built from the
module tree and holds only while that tree is one the C code implements exactly:

* every layer is a `Qwen2DecoderLayer` whose attention, norms and MLP are exactly the fused CPU
  modules (`modules.py`, no subclass: a subclass may change the math), with no forward hooks;
* every layer linear's class itself declares `kernel_layout` (qwenkit's int8 / int4 quantized
  linears with the int8-activation kernel; a wrapper such as a LoRA layer does not) and returns
  a layout;
* head size, norm eps, scale and window are the same in every layer.

The C code runs the same kernels in the same order as the module path (RMSNorm, quantized
linears with their bias, RoPE, the cache write, decode attention, SiLU·mul, residual adds), so
the hidden states are bit-identical. Each call re-checks the plan against the tree: every module
must still sit where it was, with its class and without hooks, and every parameter and buffer
must still have the storage it had
(a `load_weights(adopt=True)` or `param.data = ...` rebinds storage: the plan is rebuilt). The
RoPE table is not part of the plan: cos/sin come from the model's own rotary module each step.

The step itself must be single-query rows whose keys are all visible, offered by the attention
backend as `decode_kv(window) -> DecodeKV | None`; the rows must fit every linear's `max_rows`.
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
from qwenkit.cpu.modules import FusedQwen2Attention, FusedRMSNorm, FusedSwiGLU
from qwenkit.model.attention import AttentionBackend
from qwenkit.model.qwen2 import Qwen2DecoderLayer, Qwen2Model

_P = ctypes.c_void_p
_I = ctypes.c_int64
INT8, INT4 = 1, 2  # qk_linear.kind


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
class LinearLayout:
    """A quantized linear's weights as `qk_linear` reads them (`kind` INT8: `w` int8 in the q8
    kernel's tiles, `s` fp32 scales; INT4: `w` block codes, `sc`/`z` bf16 per group)."""

    kind: int
    n: int
    k: int
    w: torch.Tensor
    bias: torch.Tensor | None
    max_rows: int  # rows up to which the layer runs this kernel
    group_size: int = 0
    s: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    z: torch.Tensor | None = None

    def struct(self) -> _Linear:
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        return _Linear(self.kind, self.n, self.k, self.group_size, ptr(self.w), ptr(self.s), ptr(self.sc),
                       ptr(self.z), ptr(self.bias))  # fmt: skip


@dataclass
class DecodeKV:
    """What the attention backend hands the fused step: one row per sequence, each with one
    new token whose query sees every cached key of its sequence (the new one included)."""

    k_cache: Sequence[torch.Tensor]  # per layer (blocks, block_size, Hkv, D) fp32 or int8, contiguous
    v_cache: Sequence[torch.Tensor]
    slots: torch.Tensor  # (M,) int64: block * block_size + offset of each row's new key
    block_tables: torch.Tensor  # (M, max_blocks) int64, contiguous
    context_lens: torch.Tensor  # (M,) int64: cached keys after this step
    # int8 pools: per layer (blocks, block_size, Hkv) fp32 scales, contiguous; None for fp32
    k_scale: Sequence[torch.Tensor] | None = None
    v_scale: Sequence[torch.Tensor] | None = None


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    lib = build.lib()
    if lib is None:
        return None
    lib.qk_decode_layers.argtypes = [ctypes.POINTER(_Model), _P, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I, _P, _I, _P]
    lib.qk_decode_layers.restype = None
    lib.qk_decode_scratch_floats.argtypes = [ctypes.POINTER(_Model), _I]
    lib.qk_decode_scratch_floats.restype = _I
    return lib


_LAYER_PARTS = {
    "": Qwen2DecoderLayer,
    "input_layernorm": FusedRMSNorm,
    "self_attn": FusedQwen2Attention,
    "post_attention_layernorm": FusedRMSNorm,
    "mlp": FusedSwiGLU,
}
_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def _layout(lin: nn.Module) -> LinearLayout | None:
    """The layer's C layout when its own class (not a parent) declares one."""
    declared = type(lin).__dict__.get("kernel_layout")
    return declared(lin) if declared is not None else None


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


class _Plan:
    """The model's layer stack as C descriptors, plus what they were built from."""

    def __init__(self, model: Qwen2Model) -> None:
        self.ok = False
        # What the plan was built from, re-checked on every call (a plan that does not apply is
        # kept only while nothing changed either): (container, key, object) entries, tensors
        # with their storage, and modules with their class and whether they had hooks.
        self.watch: list[tuple[dict[str, Any], str, Any]] = []
        self.tensors: list[tuple[dict[str, Any], str, torch.Tensor, int]] = []
        self.modules: list[tuple[nn.Module, type, bool]] = []
        self._watch_module(model, "norm")
        self._watch_module(model, "layers")
        self._watch_tree(model.norm)
        layers = list(model.layers)
        for i, layer in enumerate(layers):
            self._watch_module(model.layers, str(i))
            self._watch_tree(layer)
        if not layers or type(model.norm) is not FusedRMSNorm or _hooked(model.norm):
            return
        layouts: list[LinearLayout] = []
        for i, layer in enumerate(layers):
            parts = dict(layer.named_modules())
            if set(parts) != set(_LAYER_PARTS) | set(_LINEARS) or any(
                type(parts[name]) is not cls or _hooked(parts[name]) for name, cls in _LAYER_PARTS.items()
            ):
                return
            for name in _LINEARS:
                lin = parts[name]
                d = _layout(lin)
                if d is None or _hooked(lin):
                    return
                layouts.append(d)
            if layer.self_attn.layer_idx != i:
                return
        attn0, ln0 = layers[0].self_attn, layers[0].input_layernorm
        uniform = all(
            (l.self_attn.scale, l.self_attn.head_dim, l.self_attn.sliding_window, l.input_layernorm.eps,
             l.post_attention_layernorm.eps) == (attn0.scale, attn0.head_dim, attn0.sliding_window, ln0.eps, ln0.eps)
            for l in layers
        )  # fmt: skip
        norms = [n for l in layers for n in (l.input_layernorm, l.post_attention_layernorm)] + [model.norm]
        if (
            not uniform
            or model.norm.eps != ln0.eps
            or attn0.head_dim not in ops.ATTN_HEAD_DIMS
            or not all(n.weight.dtype == torch.float32 and n.weight.is_cpu for n in norms)
        ):
            return
        self.layouts = layouts  # keeps the descriptors' tensors alive with the plan
        self.struct_layers = (_Layer * len(layers))()
        for i, layer in enumerate(layers):
            d = layouts[4 * i : 4 * i + 4]
            self.struct_layers[i] = _Layer(
                layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                *(x.struct() for x in d),
            )  # fmt: skip
        self.max_rows = min(d.max_rows for d in layouts)
        self.window = attn0.sliding_window
        self.model = _Model(
            len(layers), model.norm.weight.numel(), attn0.num_heads, attn0.num_kv_heads, attn0.head_dim,
            layers[0].mlp.intermediate_size, ln0.eps, attn0.scale, self.struct_layers, model.norm.weight.data_ptr(),
        )  # fmt: skip
        self.scratch = torch.empty(0)
        self.ok = True

    def _watch_module(self, parent: nn.Module, name: str) -> None:
        self.watch.append((parent._modules, name, parent._modules.get(name)))

    def _watch_tree(self, root: nn.Module) -> None:
        for m in root.modules():
            for name, child in m._modules.items():
                self.watch.append((m._modules, name, child))
            for store in (m._parameters, m._buffers):
                for name, t in store.items():
                    if t is None:
                        self.watch.append((store, name, t))
                    else:
                        self.tensors.append((store, name, t, t.data_ptr()))
            self.modules.append((m, type(m), _hooked(m)))

    def current(self) -> bool:
        """The tree still holds the same modules and tensors, on the same storage."""
        return (
            all(c.get(k) is o for c, k, o in self.watch)
            and all(c.get(k) is t and t.data_ptr() == p for c, k, t, p in self.tensors)
            and all(type(m) is cls and _hooked(m) == hooked for m, cls, hooked in self.modules)
        )


_plans: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()


def plan_for(model: Qwen2Model) -> _Plan | None:
    """The model's plan when its layers can run as one C call, else None."""
    if _lib() is None:
        return None
    plan = _plans.get(model)
    if plan is None or not plan.current():
        plan = _plans[model] = _Plan(model)
    return plan if plan.ok else None


def run(
    model: Qwen2Model, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn_metadata: AttentionBackend
) -> torch.Tensor | None:
    """h (B, T, hidden) embeddings -> the final-normed hidden states (B, T, hidden), or None when
    the fused step does not apply (the caller then runs the modules)."""
    decode_kv = getattr(attn_metadata, "decode_kv", None)
    if decode_kv is None or not ops.enabled(h, *rope):
        return None
    rows = h.shape[0] * h.shape[1]
    plan = plan_for(model)
    if plan is None or rows > plan.max_rows:
        return None
    kv = decode_kv(plan.window)
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
    ks_ptrs = vs_ptrs = None
    if kv.k_scale is not None and kv.v_scale is not None:
        ks_ptrs = (ctypes.c_void_p * n_layers)(*(t.data_ptr() for t in kv.k_scale))
        vs_ptrs = (ctypes.c_void_p * n_layers)(*(t.data_ptr() for t in kv.v_scale))
    tables, ctx, slots = kv.block_tables, kv.context_lens, kv.slots
    lib.qk_decode_layers(
        ctypes.byref(plan.model), x.data_ptr(), rows, cos.data_ptr(), sin.data_ptr(), k_ptrs, v_ptrs, ks_ptrs, vs_ptrs,
        slots.data_ptr(), tables.data_ptr(), tables.shape[1], ctx.data_ptr(), kv.k_cache[0].shape[1],
        plan.scratch.data_ptr(),
    )  # fmt: skip
    return x.view(h.shape)


def decode_kv_ok(k_cache: Sequence[torch.Tensor]) -> bool:
    """Whether a cache's per-layer pools have the layout the fused step reads (fp32, or int8
    with its scales)."""
    t = k_cache[0]
    return t.dtype in (torch.float32, torch.int8) and t.is_cpu and t.is_contiguous()


class FusedQwen2Model(Qwen2Model):
    """`Qwen2Model` that runs a decode step's layer stack as one C call when a plan applies."""

    def run_layers(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_metadata: AttentionBackend | None,
    ) -> torch.Tensor:
        if attn_metadata is not None and self.dual_chunk is None:  # DCA rotates per key chunk: torch path
            out = run(self, h, rope, attn_metadata)
            if out is not None:
                return out
        return super().run_layers(h, rope, attn_metadata)
