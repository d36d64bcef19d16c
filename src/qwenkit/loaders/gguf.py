"""GGUF reader: metadata -> ModelConfig, tensors -> dequantized HF-named weights.

qwen2 GGUF files store q/k rows in HF order (llama.cpp's convert script permutes q/k only for
the `llama` architecture), so no un-permutation happens here; `tests/test_real_parity.py`
proves it against transformers on the real file.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from qwenkit.config import ModelConfig
from qwenkit.errors import ModelIntegrityError
from qwenkit.loaders.gguf_quants import dequantize
from qwenkit.loaders.gguf_reader import FastGGUFReader, GGUFFormatError
from qwenkit.model.layers import yarn_mscale

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    # qwen2moe: router, shared expert and its gate; the routed experts are stacked (_EXPERT_NAMES)
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
# (E, rows, cols) tensors holding every expert of a layer -> mlp.experts.{e}.<proj>.weight
_EXPERT_NAMES = {
    "ffn_gate_exps.weight": "gate_proj",
    "ffn_up_exps.weight": "up_proj",
    "ffn_down_exps.weight": "down_proj",
}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_to_hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLK.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise KeyError(f"unknown GGUF tensor name {name!r} for architecture qwen2 / qwen2moe")


def hf_to_gguf_name(name: str) -> str:
    for g, h in _GLOBAL_NAMES.items():
        if h == name:
            return g
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    if m:
        for g, h in _LAYER_NAMES.items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}"
    raise KeyError(f"no GGUF name for {name!r}")


def split_gguf_tensor(name: str, w: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """One GGUF tensor (PyTorch-order shape) -> its HF-named tensor(s): a stacked expert tensor
    gives one per expert; the 1-D shared-expert gate becomes HF's (1, hidden)."""
    m = _BLK.match(name)
    if m and m.group(2) in _EXPERT_NAMES:
        if w.dim() != 3:
            raise ModelIntegrityError(f"GGUF tensor {name!r}: expected 3 dims (experts, rows, cols), got {tuple(w.shape)}")
        proj = _EXPERT_NAMES[m.group(2)]
        for e in range(w.shape[0]):
            yield f"model.layers.{m.group(1)}.mlp.experts.{e}.{proj}.weight", w[e]
        return
    hf = gguf_to_hf_name(name)
    yield hf, (w.reshape(1, -1) if hf.endswith("shared_expert_gate.weight") else w)


def gguf_rope_scaling(meta: dict[str, Any], where: str = "GGUF") -> dict[str, Any] | None:
    """HF `rope_scaling` from llama.cpp's ``{arch}.rope.scaling.*`` keys (None: plain RoPE).

    ``type`` none / linear / yarn, ``factor``, ``original_context_length``, YaRN's
    ``yarn_beta_fast`` / ``yarn_beta_slow``; ``attn_factor`` (or ``yarn_attn_factor``)
    multiplies YaRN's 0.1 ln(factor) + 1, as llama.cpp's rope kernel does.
    """
    arch = meta.get("general.architecture", "qwen2")
    pre = f"{arch}.rope.scaling."
    kind = meta.get(pre + "type")
    factor = meta.get(pre + "factor")
    if kind is None:
        # old files: a factor alone means linear scaling (llama.cpp's reading)
        kind = "linear" if factor not in (None, 0, 1, 0.0, 1.0) else "none"
    kind = str(kind)
    if kind == "none":
        return None
    if kind not in ("linear", "yarn"):
        raise ModelIntegrityError(f"{where}: {pre}type {kind!r} is not supported (none, linear, yarn)")
    if factor is None or float(factor) < 1:
        raise ModelIntegrityError(f"{where}: {pre}factor must be >= 1 for {kind} scaling, got {factor!r}")
    out: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    if kind == "yarn":
        orig = meta.get(pre + "original_context_length")
        if orig:
            out["original_max_position_embeddings"] = int(orig)
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if meta.get(pre + key):
                out[name] = float(meta[pre + key])
        attn = meta.get(pre + "attn_factor", meta.get(pre + "yarn_attn_factor"))
        if attn is not None and float(attn) != 1.0:
            out["attention_factor"] = float(attn) * yarn_mscale(float(factor))
    logger.info("%s: RoPE scaling from GGUF metadata: %s", where, out)
    return out


@dataclass
class GGUFFile:
    """An opened, validated GGUF file. Keep it alive while tensors are being read (memmap)."""

    path: Path
    reader: FastGGUFReader
    metadata: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> GGUFFile:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelIntegrityError(
                f"{path}: not a GGUF file (magic bytes {magic!r}, expected {GGUF_MAGIC!r})"
            )
        try:
            reader = FastGGUFReader(path)
        except GGUFFormatError as e:
            raise ModelIntegrityError(
                f"{path}: corrupted or truncated GGUF header ({type(e).__name__}: {e})"
            ) from None
        for t in reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise ModelIntegrityError(
                    f"{path}: truncated: tensor {t.name!r} ends at byte {end:,} but the file has "
                    f"{size:,} bytes"
                )
        meta = {k: v for k, v in reader.fields.items() if not isinstance(v, list)}
        return cls(path=path, reader=reader, metadata=meta)

    def tensor_names(self) -> list[str]:
        return [t.name for t in self.reader.tensors]

    def config(self) -> ModelConfig:
        names = {t.name: t for t in self.reader.tensors}
        if "token_embd.weight" not in names:
            raise ModelIntegrityError(f"{self.path}: no token_embd.weight tensor")
        vocab = int(names["token_embd.weight"].shape[-1])  # GGUF shape is (cols, rows)
        # qwen2moe: a layer stored with a dense FFN instead of experts is an mlp_only layer
        dense = [int(m.group(1)) for n in names if (m := _BLK.match(n)) and m.group(2) == "ffn_gate.weight"]
        config = ModelConfig.from_gguf(
            self.metadata,
            vocab_size=vocab,
            has_output_weight="output.weight" in names,
            mlp_only_layers=sorted(dense),
        )
        rope_scaling = gguf_rope_scaling(self.metadata, str(self.path))
        return config.replace(rope_scaling=rope_scaling) if rope_scaling else config

    def tensor_types(self) -> dict[str, str]:
        return {t.name: t.tensor_type.name for t in self.reader.tensors}

    def iter_weights(
        self, dtype: torch.dtype = torch.float32, progress: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, dequantized tensor in `dtype`) for every tensor in the file."""
        tensors = list(self.reader.tensors)
        bar = tqdm(
            tensors,
            desc=f"loading {self.path.name}",
            unit="tensor",
            disable=not progress or None,
            leave=False,
        )
        for t in bar:
            # no local keeps the tensor while the consumer works and the next one is made
            yield from split_gguf_tensor(t.name, self._dequantize(t).to(dtype))

    def _dequantize(self, t: Any) -> torch.Tensor:
        """One tensor of the file as fp32; errors name the file and the tensor."""
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims fastest-first
        try:
            w = dequantize(t.data, t.tensor_type, shape)
        except ValueError as e:
            raise ModelIntegrityError(f"{self.path}: tensor {t.name!r}: {e}") from None
        if not torch.isfinite(w).all():
            raise ModelIntegrityError(
                f"{self.path}: tensor {t.name!r} holds NaN or Inf after dequantization (corrupted file?)"
            )
        return w
