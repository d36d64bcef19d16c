"""`install(model)`: the CPU runtime's module swaps, made in place after construction (as
quantization swaps linears), so the model code stays plain torch and knows nothing of this
package.

Each swap replaces a module of an exact model class by its fused subclass (`modules.py`, and
`decode_step.FusedQwen2Model` for the one-call decode step). A subclass of a model class is left
alone: it may change the math. Installed modules fall back to torch wherever the C ops do not
apply, so an installed model still trains, moves devices and compiles.
"""
from __future__ import annotations

from torch import nn

from qwenkit.cpu.decode_step import FusedQwen2Model
from qwenkit.cpu.modules import FusedQwen2Attention, FusedRMSNorm, FusedSwiGLU
from qwenkit.model.layers import RMSNorm, SwiGLU
from qwenkit.model.qwen2 import Qwen2Attention, Qwen2Model

FUSED: dict[type[nn.Module], type[nn.Module]] = {
    RMSNorm: FusedRMSNorm,
    SwiGLU: FusedSwiGLU,
    Qwen2Attention: FusedQwen2Attention,
    Qwen2Model: FusedQwen2Model,
}


def install(model: nn.Module) -> nn.Module:
    """Swap the fused CPU forms into `model` in place (idempotent); returns the model."""
    for module in model.modules():
        fused = FUSED.get(type(module))
        if fused is not None:
            module.__class__ = fused  # the fused class only overrides methods: the state stays
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """Undo `install`: every fused module goes back to its plain model class (training, export
    to another runtime). Returns the model."""
    plain = {fused: base for base, fused in FUSED.items()}
    for module in model.modules():
        base = plain.get(type(module))
        if base is not None:
            module.__class__ = base
    return model
