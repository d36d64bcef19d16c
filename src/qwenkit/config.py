"""Model configuration: parsed once, at the edge, into a frozen dataclass.

`ModelConfig.from_hf` reads an HF ``config.json`` dict, `ModelConfig.from_gguf` reads GGUF
metadata; both produce the same explicit flags, so nothing downstream infers architecture from a
missing field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from qwenkit.errors import QwenkitError

# Qwen2.5 control tokens that end a turn: <|im_end|> (instruct) and <|endoftext|> (base).
QWEN_EOS_TOKEN_IDS: tuple[int, ...] = (151645, 151643)


class ConfigError(QwenkitError):
    """A model configuration is missing a required field or holds an impossible value."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # Qwen2: bias on q/k/v projections, none on o_proj
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 0
    rope_scaling: Mapping[str, Any] | None = None
    # Qwen2.5-1M: {chunk_size, local_size, original_max_position_embeddings} (qwenkit.model.dca)
    dual_chunk_attention_config: Mapping[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = QWEN_EOS_TOKEN_IDS
    architecture: str = "qwen2"
    name: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.use_sliding_window and not self.sliding_window:
            raise ConfigError("use_sliding_window=True needs a positive sliding_window")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """Window (in keys, the current one included) for a layer, or None for full attention.

        HF semantics: with `use_sliding_window`, layers with index >= `max_window_layers` slide.
        """
        if self.use_sliding_window and layer_idx >= self.max_window_layers:
            return self.sliding_window
        return None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise ConfigError(f"unsupported model_type {model_type!r} (expected 'qwen2')")
        try:
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            rope_params = cfg.get("rope_parameters") or {}
            rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 1_000_000.0))
            rope_scaling = cfg.get("rope_scaling")
            if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
                rope_scaling = dict(rope_params)
            heads = int(cfg["num_attention_heads"])
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads", heads)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
                rope_theta=float(rope_theta),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                use_sliding_window=bool(cfg.get("use_sliding_window", False)),
                sliding_window=cfg.get("sliding_window"),
                max_window_layers=int(cfg.get("max_window_layers", 0)),
                rope_scaling=rope_scaling,
                dual_chunk_attention_config=cfg.get("dual_chunk_attention_config"),
                bos_token_id=cfg.get("bos_token_id"),
                # Qwen's two EOS ids are stop ids of every Qwen2.5 checkpoint (instruct and base),
                # whichever one its config names; not of a model whose vocabulary lacks them
                eos_token_ids=tuple(dict.fromkeys(
                    eos_ids + tuple(t for t in QWEN_EOS_TOKEN_IDS if t < int(cfg["vocab_size"]))
                )),  # fmt: skip
                architecture=archs[0] if archs else "Qwen2ForCausalLM",
                name=str(cfg.get("_name_or_path", "")),
            )
        except KeyError as e:
            raise ConfigError(f"config.json is missing required field {e.args[0]!r}") from None

    @property
    def default_bos_token_id(self) -> int | None:
        """The config's BOS id, else Qwen's <|endoftext|> when the vocabulary has it."""
        if self.bos_token_id is not None:
            return self.bos_token_id
        return QWEN_EOS_TOKEN_IDS[1] if QWEN_EOS_TOKEN_IDS[1] < self.vocab_size else None

    def to_hf(self) -> dict[str, Any]:
        """An HF ``config.json`` dict that transformers' Qwen2ForCausalLM loads."""
        out: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": self.use_sliding_window,
            "sliding_window": self.sliding_window,
            "max_window_layers": self.max_window_layers,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "bos_token_id": self.default_bos_token_id,
            "eos_token_id": self.eos_token_ids[0],
            "torch_dtype": "float32",
        }
        if self.rope_scaling:
            out["rope_scaling"] = dict(self.rope_scaling)
        if self.dual_chunk_attention_config:
            out["dual_chunk_attention_config"] = dict(self.dual_chunk_attention_config)
        return out

    # ------------------------------------------------------------------ GGUF metadata
    @classmethod
    def from_gguf(
        cls, meta: Mapping[str, Any], *, vocab_size: int, has_output_weight: bool
    ) -> ModelConfig:
        """Build from GGUF key/values (already decoded to Python values).

        `vocab_size` comes from the token embedding's shape; `has_output_weight` says whether the
        file holds a separate ``output.weight`` (otherwise the head is tied to the embedding).
        """
        arch = meta.get("general.architecture")
        if arch != "qwen2":
            raise ConfigError(f"unsupported GGUF architecture {arch!r} (expected 'qwen2')")

        def get(key: str, default: Any = None) -> Any:
            full = f"{arch}.{key}"
            if full in meta:
                return meta[full]
            if default is None:
                raise ConfigError(f"GGUF metadata is missing required key {full!r}")
            return default

        heads = int(get("attention.head_count"))
        window = meta.get(f"{arch}.attention.sliding_window")
        return cls(
            vocab_size=int(vocab_size),
            hidden_size=int(get("embedding_length")),
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("attention.head_count_kv", heads)),
            max_position_embeddings=int(get("context_length", 32768)),
            rope_theta=float(get("rope.freq_base", 1_000_000.0)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            tie_word_embeddings=not has_output_weight,
            use_sliding_window=False,
            sliding_window=int(window) if window else None,
            max_window_layers=int(get("block_count")),
            architecture="Qwen2ForCausalLM",
            name=str(meta.get("general.name", "")),
        )
