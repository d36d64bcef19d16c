"""Quantization-aware training: the student's weights seen through qwenkit's own quantizer.

`apply_fake_quant(model, policy)` makes every linear / embedding that `policy` (a
`qwenkit.quant` method or spec such as ``int4-all``) would quantize run on a *dequantized grid*
in the forward pass. The grid's parameters (int4: per-group scales and zeros; int8: per-row
scales) come from `qwenkit.quant.numerics`' own search (the least-squares (scale, min) search of
int4, bf16-exact), computed once from the fp32 master weights at the start and again every
`refresh` (`refresh_fake_quant`); each forward only rounds the current master weights onto that
fixed grid: codes = clamp(round((w - z) / s + 8), 0, 15), grid = (codes - 8) * s + z (int8:
clamp(round(w / s), -127, 127) * s), the expressions of `numerics`, a few elementwise ops per
weight. Right after a search the grid is bit for bit the one `qwenkit.quant` builds from the same
weights. The backward pass is a straight-through estimator: the grid's gradient is handed to the
fp32 master weight unchanged (d grid / d w := I).

Export (`save_fake_quant_checkpoint`): a qwenkit quantized checkpoint (`qwenkit.loaders.quantized`'s
format, loaded without re-quantizing) holding the trained codes and the fixed scales, so qwenkit's
int4 / int8 kernels run exactly the trained grid. `fake_quant_state` / `load_fake_quant_state` carry
the grid parameters through a checkpoint (exact resume whatever the refresh schedule).

With LoRA the quantized weight is the *merged* one, Q(W + scale * B @ A), the weight qwenkit runs;
its gradient reaches A and B through the same STE. Frozen modules (LoRA's head / embedding) keep
their grid once computed. Decisions mirror `qwenkit.quant.convert`: roles by module name, int4
falls back to int8 where a fused layer's shape does not fit the group size (`int4_compatible`),
a tied head and embedding each get their own format (and grid) from the one shared table.
"""
from __future__ import annotations

import contextlib
import logging
import os
import types
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.quant.convert import int4_compatible, role_of
from qwenkit.quant.numerics import _int4_search, quantize_int8_per_channel
from qwenkit.quant.policy import QuantPolicy, parse

logger = logging.getLogger(__name__)

_ROWS = 2048  # rows searched at once (as numerics does): bounded temporaries for a 151,936-row head


def _group(fmt: str) -> int:
    if not fmt.startswith("int4-g"):
        raise ValueError(f"no fake quantization for format {fmt!r}")
    return int(fmt.removeprefix("int4-g"))


@torch.no_grad()
def grid_params(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qwenkit's search on w (N, K): int8 -> (row scales (N,), None); int4-gG -> (scales, zeros)
    (N, K/G), bf16-exact fp32, the values `quantize_int8_per_channel` / `quantize_int4_groupwise` pick."""
    w = w.detach().float()
    if fmt == "int8":
        return quantize_int8_per_channel(w)[1], None
    group = _group(fmt)
    n, k = w.shape
    s = torch.empty(n, k // group, dtype=torch.float32, device=w.device)
    z = torch.empty_like(s)
    for lo in range(0, n, _ROWS):
        s[lo : lo + _ROWS], z[lo : lo + _ROWS] = _int4_search(w[lo : lo + _ROWS].reshape(-1, k // group, group))
    return s, z


@torch.no_grad()
def grid_codes(w: torch.Tensor, fmt: str, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """w's codes on a fixed grid, as fp32 (N, K): int4 in [0, 15], int8 in [-127, 127] (numerics'
    expressions, done in place: one (N, K) temporary)."""
    w = w.detach()
    if fmt == "int8":
        return (w.float() / scales[:, None]).round_().clamp_(-127, 127)
    n, k = w.shape
    g = scales.shape[1]
    q = w.float().reshape(n, g, k // g) - zeros[..., None]  # type: ignore[index]
    return q.div_(scales[..., None]).add_(8.0).round_().clamp_(0, 15).reshape(n, k)


def dequantize_codes(q: torch.Tensor, fmt: str, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """`grid_codes`' output -> the grid values, in place: int8 q * s, int4 (q - 8) * s + z."""
    if fmt == "int8":
        return q.mul_(scales[:, None])
    n, k = q.shape
    g = scales.shape[1]
    return q.reshape(n, g, k // g).sub_(8.0).mul_(scales[..., None]).add_(zeros[..., None]).reshape(n, k)  # type: ignore[index]


@torch.no_grad()
def grid_values(w: torch.Tensor, fmt: str, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """fp32 (N, K): w rounded onto the fixed grid (scales, zeros)."""
    return dequantize_codes(grid_codes(w, fmt, scales, zeros), fmt, scales, zeros)


def quantize_dequantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w (N, K) -> fp32 (N, K) on qwenkit's `fmt` grid searched on w itself (``int8`` or ``int4-gG``):
    the values `Int8Linear` / `Int4Linear.from_float(...).dequantize()` hold, bit for bit."""
    return grid_values(w, fmt, *grid_params(w, fmt))


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, fmt: str, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        return grid_values(w, fmt, s, z).to(w.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        return grad, None, None, None


def fake_quant(w: torch.Tensor, fmt: str, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """The fixed grid's values of `w` in the forward pass, the identity in the backward pass (STE)."""
    return _StraightThrough.apply(w, fmt, scales, zeros)


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


# ---------------------------------------------------------------------------- patching
def _install(module: nn.Module, fmt: str, source: Any, frozen: bool) -> None:
    """Give `module` the grid state and `fake_quant_weight()`; `source(module)` is its master weight
    (LoRA: the merged one, with autograd to A and B)."""
    module.register_buffer("fq_scales", None, persistent=False)  # buffers: moved by .to(device)
    module.register_buffer("fq_zeros", None, persistent=False)
    module.fake_quant_format = fmt  # type: ignore[assignment]
    module._fq_source = types.MethodType(source, module)  # type: ignore[assignment]
    module._fq_frozen = frozen  # type: ignore[assignment]
    module._fq_cache = None  # type: ignore[assignment]
    module._fq_caching = False  # type: ignore[assignment]

    def weight(self: nn.Module) -> torch.Tensor:
        if self.fq_scales is None:  # not searched yet (no refresh_fake_quant / restored state)
            _search(self)
        if self._fq_frozen or self._fq_caching:
            if self._fq_cache is None:
                with torch.no_grad():
                    self._fq_cache = grid_values(self._fq_source(), fmt, self.fq_scales, self.fq_zeros)
            return self._fq_cache
        return fake_quant(self._fq_source(), fmt, self.fq_scales, self.fq_zeros)

    module.fake_quant_weight = types.MethodType(weight, module)  # type: ignore[assignment]


def _search(module: nn.Module) -> None:
    with torch.no_grad():
        module.fq_scales, module.fq_zeros = grid_params(module._fq_source(), module.fake_quant_format)
    module._fq_cache = None


def _patch_linear(module: nn.Linear, fmt: str) -> None:
    """module(x) = x @ grid(W).T + b, through the STE."""
    _install(module, fmt, lambda self: self.weight, frozen=not module.weight.requires_grad)

    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_quant_weight(), self.bias)

    module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]


def _patch_lora(layer: nn.Module, fmt: str) -> None:
    """A peft `lora.Linear`: x @ grid(W + scale * B @ A).T + b (qwenkit's merge order)."""
    base = layer.base_layer
    adapter = layer.active_adapters[0]
    if len(layer.active_adapters) != 1 or not isinstance(layer.lora_dropout[adapter], nn.Identity):
        raise ValueError("fake quantization with LoRA needs one adapter and lora_dropout=0 (the merged weight is "
                         "what is quantized)")

    def merged(self: nn.Module) -> torch.Tensor:
        a = self.lora_A[adapter].weight
        b = self.lora_B[adapter].weight
        return base.weight.float() + (b.float() @ a.float()) * self.scaling[adapter]

    _install(layer, fmt, merged, frozen=False)

    def forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return F.linear(x, self.fake_quant_weight(), base.bias)

    layer.forward = types.MethodType(forward, layer)


def _patch_embedding(module: nn.Embedding, fmt: str) -> None:
    _install(module, fmt, lambda self: self.weight, frozen=not module.weight.requires_grad)

    def forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        if self._fq_frozen or self._fq_caching:
            return F.embedding(ids, self.fake_quant_weight())
        if self.fq_scales is None:
            _search(self)
        # int8 rows are independent: only the looked-up rows are rounded (the grid of a 151,936-row
        # table per forward would cost more than the decoder's); the gradient reaches those rows
        rows = F.embedding(ids, self.weight)
        flat = rows.reshape(-1, rows.shape[-1])
        return fake_quant(flat, "int8", self.fq_scales[ids.reshape(-1)], None).reshape(rows.shape)

    module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]


def _patch_projection(module: nn.Module, fmt: str) -> None:
    if hasattr(module, "base_layer") and hasattr(module, "lora_A"):  # peft LoRA layer
        _patch_lora(module, fmt)
    elif isinstance(module, nn.Linear):
        _patch_linear(module, fmt)
    else:
        raise TypeError(f"cannot fake-quantize a {type(module).__name__}")


def apply_fake_quant(model: nn.Module, policy: QuantPolicy | str, search: bool = True) -> dict[str, str]:
    """Patch `model` (a plain or LoRA-injected Qwen2ForCausalLM) in place; returns {module: format}.

    search=True runs qwenkit's grid search now; else it runs at the first forward unless
    `load_fake_quant_state` restores the parameters first (a resumed run)."""
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
    model.fake_quant_modules = done  # type: ignore[assignment]
    if search:
        refresh_fake_quant(model)
    logger.info("fake quantization (%s) on %d modules", policy.spec, len(done))
    return done


def _patched(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name in getattr(model, "fake_quant_modules", {}):
        yield name, model.get_submodule(name)


def refresh_fake_quant(model: nn.Module) -> None:
    """Search every grid again on the current master weights (qwenkit's search)."""
    for _, m in _patched(model):
        _search(m)


@contextlib.contextmanager
def cached_grids(model: nn.Module) -> Iterator[None]:
    """Inside: each grid is computed once and reused (no autograd), e.g. for the many forwards of
    generation, where the weights do not change."""
    mods = [m for _, m in _patched(model)]
    for m in mods:
        m._fq_caching = True
    try:
        yield
    finally:
        for m in mods:
            m._fq_caching = False
            if not m._fq_frozen:
                m._fq_cache = None


def fake_quant_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The grid parameters: ``<module>.scales`` (and ``<module>.zeros`` for int4)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in _patched(model):
        if m.fq_scales is None:
            _search(m)
        out[f"{name}.scales"] = m.fq_scales.detach().cpu().contiguous()
        if m.fq_zeros is not None:
            out[f"{name}.zeros"] = m.fq_zeros.detach().cpu().contiguous()
    return out


def load_fake_quant_state(model: nn.Module, state: dict[str, torch.Tensor], where: str = "state") -> None:
    for name, m in _patched(model):
        s = state.get(f"{name}.scales")
        z = state.get(f"{name}.zeros")
        if s is None or (z is None) != (m.fake_quant_format == "int8"):
            raise ValueError(f"{where}: no grid parameters for {name} ({m.fake_quant_format})")
        dev = m._fq_source().device
        m.fq_scales, m.fq_zeros = s.to(dev, torch.float32), None if z is None else z.to(dev, torch.float32)
        m._fq_cache = None


# ---------------------------------------------------------------------------- export
_FUSED = ("qkv_proj", "gate_up_proj")


def _hf_module(name: str) -> str:
    """Our module name -> the HF one: LoRA's ``...qkv_proj.q_proj`` -> ``...q_proj``, no ``base_layer``."""
    parts = [p for p in name.split(".") if p != "base_layer"]
    if len(parts) >= 2 and parts[-2] in _FUSED:
        del parts[-2]
    return ".".join(parts)


def _split_rows(module: nn.Module, hf: str, tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    names = getattr(module, "shard_names", None)
    if not names or hf.rsplit(".", 1)[-1] not in _FUSED:
        for key, t in tensors.items():
            yield f"{hf}.{key}", t
        return
    parent = hf.rsplit(".", 1)[0]
    for key, t in tensors.items():
        for shard, part in zip(names, t.split(list(module.output_sizes), dim=0)):
            yield f"{parent}.{shard}.{key}", part


@torch.no_grad()
def quantized_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a qwenkit quantized checkpoint (`qwenkit.loaders.quantized`) holding the
    codes of the current master weights on the fixed grids (not a new search)."""
    from qwenkit.loaders.quantized import head_shares_embedding

    policy: QuantPolicy = model.fake_quant_policy
    shared = head_shares_embedding(model.config, policy)
    out: dict[str, torch.Tensor] = {}
    patched = dict(_patched(model))
    for name, m in patched.items():
        if shared and name == "lm_head":
            continue  # the loader ties it to the embedding's table
        fmt = m.fake_quant_format
        if m.fq_scales is None:
            _search(m)
        q = grid_codes(m._fq_source(), fmt, m.fq_scales, m.fq_zeros)
        if fmt == "int8":
            tensors = {"qweight": q.to(torch.int8), "scales": m.fq_scales.to(torch.bfloat16)}
        else:
            q = q.to(torch.uint8)
            tensors = {"qweight": q[:, 0::2] | (q[:, 1::2] << 4), "scales": m.fq_scales.to(torch.bfloat16),
                       "zeros": m.fq_zeros.to(torch.bfloat16)}
        bias = getattr(getattr(m, "base_layer", m), "bias", None)
        if isinstance(bias, torch.Tensor):
            tensors["bias"] = bias.detach().float()
        for key, t in _split_rows(m, _hf_module(name), tensors):
            out[key] = t.contiguous().cpu()
    for pname, p in model.named_parameters():
        module_name, leaf = pname.rsplit(".", 1)
        if any(module_name == n or module_name.startswith(n + ".") for n in patched):
            continue
        if "lora_" in pname:
            raise ValueError(f"{pname}: a LoRA layer without fake quantization cannot be exported quantized")
        if shared and module_name == "lm_head":
            continue
        for key, t in _split_rows(model.get_submodule(module_name), _hf_module(module_name), {leaf: p.detach().float()}):
            out[key] = t.contiguous().cpu()
    if model.config.tie_word_embeddings and not shared and policy.lm_head == "none":
        out["lm_head.weight"] = model.lm_head.weight.detach().float().contiguous().cpu()
    return out


def save_fake_quant_checkpoint(model: nn.Module, out_dir: str | os.PathLike[str], tokenizer: Any | None = None,
                               generation: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Write the trained grid as a qwenkit quantized checkpoint: `qwenkit serve DIR` / `load(DIR)`
    run these codes and scales as they are (no re-quantization)."""
    from safetensors.torch import save_file

    from qwenkit.loaders.hf import write_hf_metadata
    from qwenkit.loaders.quantized import quantization_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(quantized_tensors(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    write_hf_metadata(out, model.config, {"quantization_config": quantization_config(model.fake_quant_policy)},
                      tokenizer, generation)
    logger.info("wrote the fake-quant grid (%s) as a quantized checkpoint to %s", model.fake_quant_policy.spec, out)
    return out
