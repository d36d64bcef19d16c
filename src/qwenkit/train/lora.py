"""LoRA on our Qwen2 through peft: `prepare_lora` -> train -> `save_adapter` / `merge_lora`.

Our model fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (`MergedLinear`). A LoRA
adapter is per HF projection (its own A and B for q, k and v), so before peft sees the model each
fused linear is unfused into a `SplitLinear` whose children are plain `nn.Linear`s named as in HF
(`q_proj`, `k_proj`, `v_proj` / `gate_proj`, `up_proj`). Its output is the concatenation of its
children's, so the attention and MLP code is unchanged, and peft targets the projections by
their HF names. `save_adapter` writes peft's own format under the module names of a transformers
Qwen2 (no `qkv_proj.` segment), so `peft.PeftModel.from_pretrained` loads it on that model and
`qwenkit.loaders.lora` merges it into ours. `merge_lora` folds the adapters into the weights and
fuses the projections again, so the merged model runs the fused CPU kernels.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from qwenkit.model.layers import MergedLinear
from qwenkit.model.qwen2 import Qwen2ForCausalLM

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class SplitLinear(nn.Module):
    """A `MergedLinear` unfused: one `nn.Linear` child per HF projection, named after it.

    forward(x) = cat(child(x) for each shard), the fused layer's output, so a parent module cannot
    tell the two apart. The children's weights start as views of the fused weight (no copy).
    """

    def __init__(self, in_features: int, output_sizes: Sequence[int], shard_names: Sequence[str]) -> None:
        super().__init__()
        self.in_features = in_features
        self.output_sizes = tuple(output_sizes)
        self.shard_names = tuple(shard_names)

    @classmethod
    def from_merged(cls, merged: MergedLinear) -> SplitLinear:
        split = cls(merged.in_features, merged.output_sizes, merged.shard_names)
        for name, size in zip(merged.shard_names, merged.output_sizes):
            rows = merged.shard_slice(name)
            with torch.device("meta"):  # no random init: the weights come from the fused layer
                child = nn.Linear(merged.in_features, size, bias=merged.bias is not None)
            child.weight = nn.Parameter(merged.weight.data[rows], requires_grad=merged.weight.requires_grad)
            if merged.bias is not None:
                child.bias = nn.Parameter(merged.bias.data[rows], requires_grad=merged.bias.requires_grad)
            split.add_module(name, child)
        return split

    def to_merged(self) -> MergedLinear:
        """The fused layer again, holding the children's current (e.g. LoRA-merged) weights."""
        children = [self.get_submodule(name) for name in self.shard_names]
        for name, child in zip(self.shard_names, children):
            if type(child) is not nn.Linear:
                raise TypeError(f"{name} is a {type(child).__name__}, not a plain nn.Linear (unmerged adapter?)")
        has_bias = children[0].bias is not None
        with torch.device("meta"):
            merged = MergedLinear(self.in_features, self.output_sizes, self.shard_names, bias=has_bias)
        merged.weight = nn.Parameter(torch.cat([c.weight.data for c in children]))
        if has_bias:
            merged.bias = nn.Parameter(torch.cat([c.bias.data for c in children]))
        return merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.get_submodule(name)(x) for name in self.shard_names], dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, output_sizes={self.output_sizes}"


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def unfuse(model: nn.Module) -> nn.Module:
    """Replace every `MergedLinear` of `model` by its `SplitLinear` in place; returns the model."""
    for name, module in list(model.named_modules()):
        if type(module) is MergedLinear:
            _replace(model, name, SplitLinear.from_merged(module))
        elif isinstance(module, MergedLinear):
            raise TypeError(f"{name}: cannot unfuse a {type(module).__name__} (LoRA needs plain weights)")
    return model


def refuse(model: nn.Module) -> nn.Module:
    """Replace every `SplitLinear` of `model` by a `MergedLinear` in place; returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SplitLinear):
            _replace(model, name, module.to_merged())
    return model


def prepare_lora(
    model: Qwen2ForCausalLM,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    use_rslora: bool = False,
    **lora_kwargs: Any,
) -> Any:
    """Wrap `model` (unquantized) in a peft LoRA model; the base weights are frozen.

    `targets`: HF projection names (``q_proj`` ... ``down_proj``); the fused q/k/v and gate/up
    linears are unfused first so that each projection gets its own adapter. `lora_kwargs` go to
    `peft.LoraConfig` as they are. The model is modified in place (peft's way); `merge_lora`
    gives back a plain fused model.
    """
    from peft import LoraConfig, get_peft_model

    if not isinstance(model, Qwen2ForCausalLM):
        raise TypeError(f"prepare_lora needs a qwenkit Qwen2ForCausalLM, got {type(model).__name__}")
    unknown = set(targets) - set(DEFAULT_TARGETS) - {"lm_head"}
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {list(DEFAULT_TARGETS)}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        use_rslora=use_rslora,
        bias="none",
        **lora_kwargs,
    )
    peft_model = get_peft_model(unfuse(model), config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info("LoRA r=%d alpha=%g on %s: %d trainable of %d parameters", r, alpha, ",".join(targets), trainable, total)
    return peft_model


def _hf_module_names(model: nn.Module) -> dict[str, str]:
    """Our module-name prefixes that differ from transformers' -> theirs
    (``model.layers.0.self_attn.qkv_proj.q_proj`` -> ``model.layers.0.self_attn.q_proj``)."""
    renames: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, SplitLinear):
            parent = name.rpartition(".")[0]
            for shard in module.shard_names:
                renames[f"{name}.{shard}."] = f"{parent}.{shard}." if parent else f"{shard}."
    return renames


def adapter_state_dict(peft_model: Any, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under the names peft saves for a transformers Qwen2
    (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, ...)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    renames = {f"base_model.model.{k}": f"base_model.model.{v}"
               for k, v in _hf_module_names(peft_model.get_base_model()).items()}  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for ours, theirs in renames.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        out[key] = tensor.detach().contiguous()
    return out


def save_adapter(
    peft_model: Any,
    out_dir: str | os.PathLike[str],
    base_model_name_or_path: str | None = None,
    adapter_name: str = "default",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` in peft's format, loadable by
    `peft.PeftModel.from_pretrained` on a transformers Qwen2 and by `qwenkit.loaders.lora`.

    `dtype`: the tensors' dtype on disk (default: as trained)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(peft_model, adapter_name)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    save_file({k: v.cpu() for k, v in state.items()}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = peft_model.peft_config[adapter_name]
    saved = copy.deepcopy(config)  # the live config stays as it is
    saved.base_model_name_or_path = base_model_name_or_path
    saved.task_type = "CAUSAL_LM"  # transformers' AutoPeftModelForCausalLM / PeftModelForCausalLM
    saved.inference_mode = True  # as peft's save_pretrained writes it
    saved.save_pretrained(str(out))
    logger.info("saved LoRA adapter (%d tensors) to %s", len(state), out)
    return out


def merge_lora(peft_model: Any) -> Qwen2ForCausalLM:
    """Fold the adapters into the base weights (W + scale * B @ A) and fuse q/k/v and gate/up
    again: a plain `Qwen2ForCausalLM` whose parameters are trainable again, as a loaded model's."""
    model = peft_model.merge_and_unload()
    refuse(model)
    for p in model.parameters():
        p.requires_grad_(True)
    if not isinstance(model, Qwen2ForCausalLM):
        raise TypeError(f"merge_lora: expected a Qwen2ForCausalLM underneath, got {type(model).__name__}")
    return model
