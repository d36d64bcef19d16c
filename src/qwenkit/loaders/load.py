"""Top-level loading: a registry name, a .gguf file, an HF folder or a hub id -> model/tokenizer."""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from qwenkit import cpu
from qwenkit.config import ModelConfig
from qwenkit.errors import AdapterError, ModelIntegrityError
from qwenkit.loaders.catalog import DEFAULT_MODEL
from qwenkit.loaders.gguf import GGUFFile
from qwenkit.loaders.gguf_tokenizer import tokenizer_from_gguf
from qwenkit.loaders.hf import generation_config, hf_config, iter_hf_weights
from qwenkit.loaders.lora import merge_adapter_into, read_adapter
from qwenkit.loaders.quantized import load_quantized, read_quantization_config
from qwenkit.loaders.resolve import resolve_model
from qwenkit.model import Qwen2ForCausalLM, causal_lm_class
from qwenkit.model.layers import RopeScalingError, RotaryEmbedding, rope_type
from qwenkit.quant import quantize_model, resolve_method
from qwenkit.quant.convert import quantize_while_loading
from qwenkit.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Sampling defaults of the Qwen2.5(-Coder) instruct models, used when the checkpoint carries no
# generation_config.json (GGUF files do not).
QWEN_INSTRUCT_GENERATION_DEFAULTS: dict[str, Any] = {
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
}


@dataclass
class ModelSource:
    format: str  # "gguf" | "hf"
    path: Path
    name: str


def resolve(spec: str | os.PathLike[str], *, tokenizer_only: bool = False) -> ModelSource:
    r = resolve_model(spec, tokenizer_only=tokenizer_only)
    return ModelSource(format=r.format, path=Path(r.path), name=r.name)


def _to_device(
    weights: Iterator[tuple[str, torch.Tensor]], device: str | torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    # map() keeps no reference to the item it returned; a generator's loop variable would hold
    # each tensor until the next one exists (loading peak memory)
    return map(lambda item: (item[0], item[1].to(device)), weights)


def build_empty_model(config: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> Qwen2ForCausalLM:
    """Construct without random init (meta device), then allocate uninitialised storage."""
    with torch.device("meta"):
        model = causal_lm_class(config)(config)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def parse_rope_scaling(value: Mapping[str, Any] | str) -> dict[str, Any] | None:
    """A `rope_scaling` dict or JSON text (``--rope-scaling``), checked; None for default RoPE."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RopeScalingError(f"rope_scaling: invalid JSON ({e}): {value!r}") from None
    if not isinstance(value, Mapping):
        raise RopeScalingError(f"rope_scaling must be a JSON object, got {value!r}")
    out = dict(value)
    if out and "rope_type" not in out and "type" not in out:
        raise RopeScalingError(f"rope_scaling.rope_type is missing (linear, dynamic, yarn, ntk or default): {out!r}")
    if rope_type(out) == "default":
        return None
    RotaryEmbedding(8, 16, 10000.0, out)  # unknown types and bad factors fail here, by name
    return out


def add_rope_scaling_arg(parser: Any) -> None:
    """``--rope-scaling JSON``: the one definition shared by every command that loads a model."""
    parser.add_argument(
        "--rope-scaling", default=None, metavar="JSON",
        help='replace the model\'s RoPE scaling (HF rope_scaling), e.g. \'{"rope_type":"yarn","factor":4,'
             '"original_max_position_embeddings":32768}\'; add "dynamic":true for a per-request factor '
             '(1/2/4 by prompt + max_tokens); types: linear, dynamic, yarn, ntk (with "alpha")',
    )  # fmt: skip


@dataclass
class LoadedModel:
    model: Qwen2ForCausalLM
    tokenizer: Any
    config: ModelConfig
    source: ModelSource
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    tensor_types: dict[str, str] = field(default_factory=dict)
    load_seconds: float = 0.0
    image_processor: Any = None  # vision-language models: the folder's preprocessor_config.json


def load(
    spec: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    quantization: str = "none",
    lora: str | os.PathLike[str] | None = None,
    rope_scaling: Mapping[str, Any] | str | None = None,
) -> LoadedModel:
    """`rope_scaling`: HF's dict (or its JSON) replacing the checkpoint's, e.g.
    ``{"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 32768}``
    (`qwenkit.model.layers.RotaryEmbedding` lists the types); ``{"rope_type": "default"}``
    turns a checkpoint's scaling off. `quantization`: a `qwenkit.quant` method (``none``, ``auto``, ``int8``, ``int4``,
    ``mixed``, ... or a policy spec); weights are quantized after loading. A quantized
    checkpoint (``qwenkit quantize``) loads as stored, whatever this says. `lora`: a peft LoRA
    adapter folder, merged into the weights after loading and before quantizing
    (`qwenkit.loaders.lora`). On the CPU the runtime's fused modules are swapped in
    (`qwenkit.cpu.install`)."""
    t0 = time.perf_counter()
    adapter = read_adapter(lora) if lora is not None else None  # a bad adapter fails before the load
    src = resolve(spec)
    tensor_types: dict[str, str] = {}
    if src.format == "gguf":
        gf = GGUFFile.open(src.path)
        config = gf.config()
        weights = gf.iter_weights(dtype=dtype, progress=progress)
        tokenizer = tokenizer_from_gguf(gf.reader)
        gen = dict(QWEN_INSTRUCT_GENERATION_DEFAULTS)
        tensor_types = gf.tensor_types()
    else:
        config = hf_config(src.path)
        weights = iter_hf_weights(src.path, dtype=dtype, progress=progress)
        tokenizer = Tokenizer.from_hf_dir(src.path)
        gen = generation_config(src.path) or dict(QWEN_INSTRUCT_GENERATION_DEFAULTS)
    if not config.name:
        config = config.replace(name=src.name)
    if rope_scaling is not None:
        config = config.replace(rope_scaling=parse_rope_scaling(rope_scaling))
    if src.format == "hf" and read_quantization_config(src.path) is not None:
        if adapter is not None:
            raise AdapterError(
                f"{src.path}: a LoRA adapter merges into full-precision weights, not a quantized "
                "checkpoint; load the original model with the adapter and quantize after"
            )
        model = load_quantized(src.path, config, device)
    else:
        model = build_empty_model(config, dtype, device)
        method = resolve_method(quantization)
        stream = _to_device(weights, device)
        # each module quantized as soon as it is loaded (peak memory); with an adapter, after merging
        if method != "none" and adapter is None:
            stream = quantize_while_loading(model, method, stream)
        loaded = model.load_weights(stream, adopt=src.format == "gguf")  # GGUF: fresh dequantized tensors
        expected = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        missing = expected - loaded
        if missing:
            raise ModelIntegrityError(f"{src.path}: missing tensors {sorted(missing)[:8]}")
        if adapter is not None:
            merge_adapter_into(model, adapter)
        if method != "none":
            quantize_model(model, method)  # what is left (tied tables) + the policy record
    if torch.device(device).type == "cpu":
        cpu.install(model)
        if config.moe is not None:
            logger.info("qwen2_moe: the CPU runtime's one-call decode step covers dense Qwen2 layers "
                        "only; the MoE decoder runs its (fused) modules one by one")
    processor = None
    if config.multimodal is not None:
        from qwenkit.multimodal.processor import ImageProcessor

        processor = ImageProcessor.from_pretrained(src.path)
        model.image_processor = processor  # engines built from the module alone find it here
    dt = time.perf_counter() - t0
    logger.info("loaded %s (%s) in %.1fs", src.name, src.format, dt)
    return LoadedModel(model, tokenizer, config, src, gen, tensor_types, dt, processor)


def load_model(
    spec: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantization: str = "none",
) -> Qwen2ForCausalLM:
    """Load a model for scoring: ``model(input_ids (B, T)) -> logits (B, T, vocab)``."""
    return load(spec or DEFAULT_MODEL, dtype=dtype, device=device, quantization=quantization).model


def load_tokenizer(spec: str | os.PathLike[str] | None = None) -> Tokenizer:
    """The tokenizer of a registry name, ``.gguf`` file, HF (tokenizer) folder or hub id.

    A hub id fetches only the tokenizer files, not the weights.
    """
    src = resolve(spec or DEFAULT_MODEL, tokenizer_only=True)
    if src.format == "gguf":
        return tokenizer_from_gguf(GGUFFile.open(src.path).reader)
    return Tokenizer.from_hf_dir(src.path)
