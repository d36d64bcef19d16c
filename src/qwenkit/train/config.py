"""Training configuration: one dataclass, recipe defaults, config files and `key=value` overrides.

A run's configuration is the recipe's defaults, then a config file (`--config`: JSON, YAML or
TOML), then `key=value` overrides from the command line; the result is printed in full at start
and saved beside every checkpoint (`train_config.json`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenkit.errors import QwenkitError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainConfigError(QwenkitError, ValueError):
    pass


@dataclass
class TrainConfig:
    recipe: str = "sft"  # pretrain | sft | dpo | grpo | distill
    model: str = "qwen2.5-coder-0.5b-instruct"
    data: str = ""
    out: str = ""
    eval_data: str | None = None
    eval_examples: int = 0  # without eval_data: hold out the last N examples
    # sequences
    max_length: int = 2048
    overflow: str = "truncate"  # truncate | drop | split (pretraining: chunk long documents)
    packing: bool = True  # best-fit-decreasing rows of max_length; False: length buckets
    bucket_lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    token_budget: int = 8192  # bucketing: rows per step = token_budget // bucket length
    batch_size: int = 8  # packing: rows per optimizer step, all ranks together
    micro_batch_size: int = 1  # rows per forward/backward on one rank
    # schedule
    max_steps: int = 0  # 0: run `epochs` epochs
    epochs: float = 1.0
    lr: float = 7e-6
    min_lr: float = 7e-7
    warmup_steps: int = -1  # -1: warmup_ratio of the run
    warmup_ratio: float = 0.03
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    # compute
    precision: str = "auto"  # auto | fp32 | bf16 (autocast, fp32 master weights)
    gradient_checkpointing: bool = False
    loss_chunk: int = 512  # rows of the LM head + cross-entropy at a time
    num_threads: int = 0  # 0: torch's default
    fsdp: bool = False
    device: str = "auto"  # auto | cpu | cuda
    # LoRA (peft)
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    # post-training, TRL's names; one field serves several recipes, each with its own default
    # (RECIPES): beta = DPO's beta / GRPO's KL coefficient / GKD's JSD interpolation
    beta: float = 0.0
    loss_type: str = ""  # DPO: sigmoid | ipo | robust; GRPO: grpo | dr_grpo | dapo
    temperature: float = 1.0  # sampling temperature of rollouts / distillation temperature

    # DPO (train/dpo.py; TRL's DPOConfig names)
    label_smoothing: float = 0.0  # robust loss: the assumed rate of flipped labels, in [0, 0.5)
    precompute_ref: bool = False  # reference log-probs computed once before training (TRL precompute_ref_log_probs)
    ref_model: str | None = None  # the reference model; default the starting model (LoRA: adapters disabled)
    max_prompt_length: int = 0  # > 0: keep only the last N prompt tokens (GRPO's default: 512)
    truncation_mode: str = "keep_start"  # rows over max_length: keep_start | keep_end

    # GRPO (train/grpo.py), TRL's names; batch_size counts completions (prompts x num_generations)
    num_generations: int = 8  # completions per prompt (the group)
    max_completion_length: int = 256
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    epsilon: float = 0.2  # clipping: ratio in [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float = 0.0  # 0: = epsilon (DAPO's clip-higher: e.g. 0.28)
    scale_rewards: str = "group"  # group | batch | none
    num_iterations: int = 1  # optimizer steps per rollout batch (old log-probs when > 1)
    reward_funcs: tuple[str, ...] = ("code",)  # code | format | module:function
    reward_weights: tuple[float, ...] = ()  # empty: 1.0 each
    reward_timeout: float = 5.0  # seconds per test of the code reward
    order_by_reward_variance: bool = False  # pre-pass: prompts with varying rewards first
    rollout_quantization: str = "none"  # none | int8 (a quantized view, re-quantized every step)
    vllm_importance_sampling_correction: bool = True  # with quantized rollouts
    vllm_importance_sampling_mode: str = "token_truncate"  # token|sequence _truncate|_mask
    vllm_importance_sampling_clip_max: float = 3.0  # 0: none
    vllm_importance_sampling_clip_min: float = 0.0  # 0: none

    # distillation (train/distill.py)
    teacher: str = ""  # model spec; "" with fake_quant: the student's own fp32 weights (self-distillation)
    kd_ratio: float = 1.0  # loss = kd_ratio * KD + (1 - kd_ratio) * CE
    kd_loss: str = "kl"  # kl: forward KL(teacher_T || student_T) * T^2 | jsd: TRL GKD's generalized JSD (beta)
    teacher_top_k: int = 0  # > 0: teacher's top-k log-probs cached to disk by a pre-pass, KD on that support
    teacher_cache: str = ""  # the cache folder ("" = OUT/teacher_topk)
    fake_quant: str = ""  # a qwenkit quantization method / policy (int4-all, int4, ...): train through it
    fake_quant_refresh: int = 0  # search the grid again every N steps (0: only at the start)
    lmbda: float = 0.0  # GKD: probability that a step's completions are sampled by the student (on-policy)
    max_new_tokens: int = 128  # on-policy completions: the most tokens sampled per prompt

    # bookkeeping
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: only at the start and the end
    save_every: int = 0  # 0: only at the end (and on Ctrl-C)
    save_total_limit: int = 0  # 0: keep every checkpoint
    resume: str | None = None  # a checkpoint folder, or "auto" (the latest in `out`)
    tensorboard: bool = True
    memory_check: bool = True
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # recipe-specific settings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPES: dict[str, dict[str, Any]] = {
    # continued pretraining (seed defaults): cosine 3e-4 -> 1e-5, length buckets 512..8192 with a
    # budget of 8192 tokens a step, long documents chunked rather than cut
    "pretrain": dict(lr=3e-4, min_lr=1e-5, packing=False, overflow="split", max_length=8192,
                     weight_decay=0.1, warmup_ratio=0.05),
    # SFT (seed defaults): cosine 7e-6 -> 7e-7, weight decay 0.1 (not norms / biases), clip 1.0
    "sft": dict(lr=7e-6, min_lr=7e-7, packing=True, overflow="truncate", max_length=2048,
                weight_decay=0.1, max_grad_norm=1.0),

    # DPO (seed: beta 0.1, sigmoid loss)
    "dpo": dict(beta=0.1, loss_type="sigmoid", packing=False, max_length=1024, lr=1e-6, min_lr=1e-7),

    # GRPO (TRL's defaults: no KL term, temperature 1.0)
    "grpo": dict(beta=0.0, loss_type="grpo", temperature=1.0, packing=False, max_length=1024, lr=1e-6,
                 min_lr=1e-7, max_prompt_length=512),

    # distillation (TRL GKD's defaults: beta 0.5, temperature 0.9)
    "distill": dict(beta=0.5, temperature=0.9, packing=True, max_length=1024, lr=5e-6, min_lr=5e-7,
                    loss_chunk=128),  # KD holds ~6 (chunk x vocab) fp32 blocks (student, teacher, softmaxes)
}
# LoRA trains ~1% of the weights from zero-initialised B: it needs a far larger learning rate than
# full SFT (peft / TRL examples use 1e-4..2e-4). Applied when `lora=true` and lr was not given.
LORA_DEFAULTS: dict[str, Any] = dict(lr=1e-4, min_lr=1e-5)

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise TrainConfigError(f"{p}: cannot read config file ({e.strerror})") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as e:  # the parsers' errors name line and column
        raise TrainConfigError(f"{p}: not valid {p.suffix.lstrip('.') or 'json'}: {e}") from None
    if not isinstance(data, dict):
        raise TrainConfigError(f"{p}: expected a mapping of settings, got {type(data).__name__}")
    return data


def _coerce(name: str, value: Any) -> Any:
    hint = typing.get_type_hints(TrainConfig)[name]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        return None
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint in (int, float):
            if isinstance(value, bool):
                raise ValueError(value)
            v = hint(value)
            if hint is int and isinstance(value, float) and v != value:
                raise ValueError(value)
            return v
        if origin is tuple:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v] if not value.startswith("[") else json.loads(value)
            return tuple(args[0](v) for v in value)
        if origin is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        return str(value)
    except (TypeError, ValueError, json.JSONDecodeError):
        raise TrainConfigError(f"setting {name!r}: cannot use {value!r} as {hint}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["lr=1e-4", "lora=true"]` -> {"lr": "1e-4", "lora": "true"} (coerced later)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TrainConfigError(f"override {item!r}: expected key=value")
        out[key.strip().replace("-", "_")] = value
    return out


def build_config(recipe: str, *layers: dict[str, Any]) -> TrainConfig:
    """Recipe defaults, then each layer of settings in order (file, CLI flags, overrides)."""
    if recipe not in RECIPES:
        raise TrainConfigError(f"unknown recipe {recipe!r}; choose from {sorted(RECIPES)}")
    merged: dict[str, Any] = {"recipe": recipe, **RECIPES[recipe]}
    given: set[str] = set()
    for layer in layers:
        for key, value in layer.items():
            if key not in _FIELDS:
                raise TrainConfigError(f"unknown setting {key!r} (settings: {', '.join(sorted(_FIELDS))})")
            merged[key] = _coerce(key, value)
            given.add(key)
    if _coerce("lora", merged.get("lora", False)):
        for key, value in LORA_DEFAULTS.items():
            if key not in given:
                merged[key] = value
    cfg = TrainConfig(**merged)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    def bad(name: str, why: str) -> None:
        raise TrainConfigError(f"setting {name!r}={getattr(cfg, name)!r}: {why}")

    if cfg.overflow not in ("truncate", "drop", "split"):
        bad("overflow", "expected truncate, drop or split")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        bad("precision", "expected auto, fp32 or bf16")
    for name in ("max_length", "batch_size", "micro_batch_size", "token_budget", "loss_chunk", "lora_r"):
        if getattr(cfg, name) <= 0:
            bad(name, "must be positive")
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        bad("min_lr", f"need 0 <= min_lr <= lr (lr={cfg.lr})")
    if cfg.max_steps < 0 or cfg.epochs <= 0 and cfg.max_steps == 0:
        bad("max_steps", "set max_steps > 0 or epochs > 0")
    if cfg.recipe == "dpo":
        if cfg.loss_type not in ("sigmoid", "ipo", "robust"):
            bad("loss_type", "DPO losses: sigmoid, ipo or robust")
        if cfg.beta <= 0:
            bad("beta", "must be positive")
        if not 0.0 <= cfg.label_smoothing < 0.5:
            bad("label_smoothing", "must lie in [0, 0.5)")
        if cfg.truncation_mode not in ("keep_start", "keep_end"):
            bad("truncation_mode", "expected keep_start or keep_end")
        if cfg.max_prompt_length < 0:
            bad("max_prompt_length", "must be >= 0 (0: no limit)")
    if cfg.recipe == "grpo":
        if cfg.loss_type not in ("grpo", "dr_grpo", "dapo"):
            bad("loss_type", "GRPO: expected grpo, dr_grpo or dapo")
        if cfg.num_generations < 2:
            bad("num_generations", "need at least 2 completions per prompt (advantages are group-relative)")
        if cfg.batch_size % cfg.num_generations:
            bad("batch_size", f"counts completions: must be a multiple of num_generations={cfg.num_generations}")
        for name in ("max_prompt_length", "max_completion_length", "num_iterations"):
            if getattr(cfg, name) <= 0:
                bad(name, "must be positive")
        if cfg.scale_rewards not in ("group", "batch", "none"):
            bad("scale_rewards", "expected group, batch or none")
        if not 0 < cfg.epsilon < 1 or cfg.epsilon_high < 0:
            bad("epsilon", "need 0 < epsilon < 1 and epsilon_high >= 0")
        if cfg.temperature <= 0 or not 0 < cfg.top_p <= 1:
            bad("temperature", "GRPO samples: need temperature > 0 and 0 < top_p <= 1")
        if cfg.rollout_quantization not in ("none", "int8"):
            bad("rollout_quantization", "expected none or int8")
        if cfg.rollout_quantization != "none" and cfg.lora:
            bad("rollout_quantization", "quantized rollouts need full training (LoRA layers are not quantized)")
        if (cfg.rollout_quantization != "none" and cfg.vllm_importance_sampling_correction
                and cfg.temperature != 1.0):
            bad("temperature", "the importance-sampling correction compares the engine's raw (temperature 1) "
                "log-probs: use temperature=1 or vllm_importance_sampling_correction=false")
        if cfg.vllm_importance_sampling_mode not in ("token_truncate", "token_mask", "sequence_truncate",
                                                     "sequence_mask"):
            bad("vllm_importance_sampling_mode", "expected token_truncate, token_mask, sequence_truncate or "
                "sequence_mask")
        if not cfg.reward_funcs:
            bad("reward_funcs", "need at least one reward function")
    unknown = set(cfg.lora_targets) - set(LORA_TARGETS)
    if unknown:
        bad("lora_targets", f"unknown projections {sorted(unknown)}; choose from {LORA_TARGETS}")
    if cfg.recipe == "distill":
        if not 0.0 <= cfg.kd_ratio <= 1.0:
            bad("kd_ratio", "expected 0 <= kd_ratio <= 1")
        if cfg.kd_loss not in ("kl", "jsd"):
            bad("kd_loss", "expected kl or jsd")
        if not 0.0 <= cfg.beta <= 1.0:
            bad("beta", "the JSD interpolation needs 0 <= beta <= 1")
        if cfg.temperature <= 0:
            bad("temperature", "must be positive")
        if cfg.teacher_top_k < 0:
            bad("teacher_top_k", "must be >= 0 (0: teacher logits on the fly)")
        if not cfg.teacher and not cfg.fake_quant:
            bad("teacher", "name a teacher model (or set fake_quant for self-distillation from fp32 weights)")
        if cfg.fake_quant_refresh < 0:
            bad("fake_quant_refresh", "must be >= 0 (0: search the grid only at the start)")
        if not 0.0 <= cfg.lmbda <= 1.0:
            bad("lmbda", "the on-policy fraction needs 0 <= lmbda <= 1")
        if cfg.lmbda > 0 and cfg.max_new_tokens <= 0:
            bad("max_new_tokens", "must be positive")
        if cfg.lmbda > 0 and cfg.teacher_top_k:
            bad("teacher_top_k", "a cached teacher cannot score on-policy completions: use lmbda=0 or teacher_top_k=0")
        if cfg.fake_quant and cfg.fsdp:
            bad("fsdp", "fake quantization needs whole weights on each rank (DDP), not FSDP shards")
        if cfg.fake_quant:
            from qwenkit.quant.policy import parse

            try:
                parse(cfg.fake_quant)
            except ValueError as e:
                bad("fake_quant", str(e))
