"""Model configuration: parsed once, at the edge, into a frozen dataclass.

`ModelConfig.from_hf` reads an HF ``config.json`` dict, `ModelConfig.from_gguf` reads GGUF
metadata; both produce the same explicit flags, so nothing downstream infers architecture from a
missing field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from qwenkit.errors import QwenkitError

# Qwen2.5 control tokens that end a turn: <|im_end|> (instruct) and <|endoftext|> (base).
QWEN_EOS_TOKEN_IDS: tuple[int, ...] = (151645, 151643)


class ConfigError(QwenkitError):
    """A model configuration is missing a required field or holds an impossible value."""


@dataclass(frozen=True)
class MoeConfig:
    """The routed-expert fields of an HF ``Qwen2MoeConfig`` (same names and defaults)."""

    num_experts: int = 60
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 1408
    shared_expert_intermediate_size: int = 5632
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ConfigError(f"num_experts={self.num_experts} must be >= 1 for model_type 'qwen2_moe'")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]"
            )
        if self.decoder_sparse_step < 1:
            raise ConfigError(f"decoder_sparse_step={self.decoder_sparse_step} must be >= 1")

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> MoeConfig:
        d = cls()
        return cls(
            num_experts=int(cfg.get("num_experts", d.num_experts)),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", d.num_experts_per_tok)),
            moe_intermediate_size=int(cfg.get("moe_intermediate_size", d.moe_intermediate_size)),
            shared_expert_intermediate_size=int(
                cfg.get("shared_expert_intermediate_size", d.shared_expert_intermediate_size)
            ),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", d.norm_topk_prob)),
            decoder_sparse_step=int(cfg.get("decoder_sparse_step", d.decoder_sparse_step)),
            mlp_only_layers=tuple(int(i) for i in (cfg.get("mlp_only_layers") or ())),
            router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", d.router_aux_loss_coef)),
            output_router_logits=bool(cfg.get("output_router_logits", d.output_router_logits)),
        )

    def to_hf(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mlp_only_layers"] = list(self.mlp_only_layers)
        return out


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
    moe: MoeConfig | None = None  # model_type qwen2_moe: routed experts replace some MLPs
    # model_type qwen2_5_vl: {"vision_config", "mrope_section", "image_token_id", ...}
    # (parsed by qwenkit.model.qwen2_5_vl); None for a text-only model
    multimodal: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)
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
        if self.moe is not None and self.use_sliding_window:
            # HF's qwen2_moe slides a different layer pattern than qwen2; not implemented here
            raise ConfigError("use_sliding_window=True is not supported for model_type 'qwen2_moe'")

    @property
    def model_type(self) -> str:
        if self.multimodal is not None:
            return "qwen2_5_vl"
        return "qwen2" if self.moe is None else "qwen2_moe"

    def is_moe_layer(self, layer_idx: int) -> bool:
        """HF's layout: a layer is sparse unless listed in mlp_only_layers, every
        decoder_sparse_step-th layer (1-based)."""
        m = self.moe
        return (
            m is not None
            and layer_idx not in m.mlp_only_layers
            and (layer_idx + 1) % m.decoder_sparse_step == 0
        )

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
        if model_type not in ("qwen2", "qwen2_moe", "qwen2_5_vl"):
            raise ConfigError(
                f"unsupported model_type {model_type!r} (expected 'qwen2', 'qwen2_moe' or 'qwen2_5_vl')"
            )
        multimodal = None
        if model_type == "qwen2_5_vl":
            cfg, multimodal = _split_vl_config(cfg)
        moe = MoeConfig.from_hf(cfg) if model_type == "qwen2_moe" else None
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
                attention_bias=bool(cfg.get("qkv_bias", True)) if moe else True,
                moe=moe,
                multimodal=multimodal,
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
        if self.moe is not None:
            out.update(self.moe.to_hf(), architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
                       qkv_bias=self.attention_bias)
        if self.dual_chunk_attention_config:
            out["dual_chunk_attention_config"] = dict(self.dual_chunk_attention_config)
        if self.multimodal is not None:  # the hub checkpoints' flat layout
            mm = dict(self.multimodal)
            out.update(
                architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
                rope_scaling={"type": "mrope", "mrope_section": list(mm.pop("mrope_section"))}, **mm,
            )  # fmt: skip
        return out

    # ------------------------------------------------------------------ GGUF metadata
    @classmethod
    def from_gguf(
        cls,
        meta: Mapping[str, Any],
        *,
        vocab_size: int,
        has_output_weight: bool,
        mlp_only_layers: Sequence[int] = (),
    ) -> ModelConfig:
        """Build from GGUF key/values (already decoded to Python values).

        `vocab_size` comes from the token embedding's shape; `has_output_weight` says whether the
        file holds a separate ``output.weight`` (otherwise the head is tied to the embedding);
        `mlp_only_layers` (qwen2moe): the layers the file stores with a dense FFN.
        """
        arch = meta.get("general.architecture")
        if arch not in ("qwen2", "qwen2moe"):
            raise ConfigError(f"unsupported GGUF architecture {arch!r} (expected 'qwen2' or 'qwen2moe')")

        def get(key: str, default: Any = None) -> Any:
            full = f"{arch}.{key}"
            if full in meta:
                return meta[full]
            if default is None:
                raise ConfigError(f"GGUF metadata is missing required key {full!r}")
            return default

        heads = int(get("attention.head_count"))
        window = meta.get(f"{arch}.attention.sliding_window")
        moe = None
        if arch == "qwen2moe":
            moe = MoeConfig(
                num_experts=int(get("expert_count")),
                num_experts_per_tok=int(get("expert_used_count")),
                moe_intermediate_size=int(get("expert_feed_forward_length")),
                shared_expert_intermediate_size=int(get("expert_shared_feed_forward_length")),
                # llama.cpp's qwen2moe does not renormalise the top-k weights unless told
                norm_topk_prob=bool(get("expert_weights_norm", False)),
                mlp_only_layers=tuple(mlp_only_layers),
            )
        return cls(
            vocab_size=int(vocab_size),
            hidden_size=int(get("embedding_length")),
            # qwen2moe files without a dense layer may omit the dense FFN width
            intermediate_size=int(get("feed_forward_length", 0 if moe else None)),
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
            architecture="Qwen2MoeForCausalLM" if moe else "Qwen2ForCausalLM",
            name=str(meta.get("general.name", "")),
            moe=moe,
        )


# Qwen2.5-VL token ids (transformers' Qwen2_5_VLConfig defaults)
VL_TOKEN_DEFAULTS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}


def _split_vl_config(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ``qwen2_5_vl`` config.json -> (the text fields, flat as a qwen2 config, the multimodal
    fields). Text fields may be top-level (hub checkpoints) or under ``text_config``
    (transformers 5.x ``save_pretrained``); the latter wins, as transformers reads them."""
    text = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
    text.update(cfg.get("text_config") or {})
    text.setdefault("rms_norm_eps", 1e-5)  # Qwen2_5_VLTextConfig's default
    rope = dict(text.pop("rope_scaling", None) or text.pop("rope_parameters", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("mrope", "default"):
        raise ConfigError(f"qwen2_5_vl: rope_scaling type {kind!r} is not supported (expected 'mrope' or 'default')")
    if "rope_theta" in rope and "rope_theta" not in text:
        text["rope_theta"] = rope["rope_theta"]
    text.pop("rope_parameters", None)
    vision = cfg.get("vision_config")
    if not isinstance(vision, Mapping):
        raise ConfigError("qwen2_5_vl config.json is missing 'vision_config'")
    # transformers reads tie_word_embeddings at the top level, or from an old text_config
    text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings") or (cfg.get("text_config") or {}).get("tie_word_embeddings"))
    mm: dict[str, Any] = {k: int(cfg.get(k, d)) for k, d in VL_TOKEN_DEFAULTS.items()}
    mm["mrope_section"] = [int(x) for x in rope.get("mrope_section", (16, 24, 24))]
    mm["vision_config"] = dict(vision)
    return text, mm
