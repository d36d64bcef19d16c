"""SamplingParams with vLLM's names, so users' code ports over."""
from __future__ import annotations

import json as jsonlib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

MAX_LOGPROBS = 20
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for logit_bias values


@dataclass(frozen=True)
class ToolCallSpec:
    """One function a forced tool call may name; `parameters` is its JSON Schema (None: any object)."""

    name: str
    parameters: Mapping[str, Any] | None = None


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a grammar (vLLM's `StructuredOutputsParams`); set exactly one of:

    - `json`: a JSON Schema (an object, or its JSON text);
    - `json_object`: any JSON object;
    - `regex`: a regular expression the whole output matches;
    - `grammar`: an EBNF grammar (xgrammar's dialect, GBNF-like, start rule `root`);
    - `choice`: one of these strings, verbatim;
    - `tool_calls` (qwenkit): exactly one Hermes ``<tool_call>`` block calling one of these
      functions, as Qwen2.5's chat template writes it.

    JSON is generated without free whitespace and objects take no properties beyond the schema's.
    """

    json: Mapping[str, Any] | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None
    tool_calls: list[ToolCallSpec] | None = None

    def __post_init__(self) -> None:
        if self.tool_calls is not None:
            self.tool_calls = [t if isinstance(t, ToolCallSpec) else ToolCallSpec(**t) for t in self.tool_calls]
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"structured_outputs.{name} {why}, got {getattr(self, name)!r}")

        kinds = self.kinds()
        if len(kinds) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, json_object, regex, grammar, choice, "
                f"tool_calls; got {kinds or 'none'}"
            )
        if isinstance(self.json, str):
            try:
                jsonlib.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        elif self.json is not None and not isinstance(self.json, Mapping):
            raise bad("json", "must be a JSON Schema object or its JSON text")
        if self.json_object is not None and self.json_object is not True:
            raise bad("json_object", "must be True when given")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise bad(name, "must be a non-empty string")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise bad("choice", "must be a non-empty list of non-empty strings")
        if self.tool_calls is not None:
            if not self.tool_calls:
                raise bad("tool_calls", "must name at least one function")
            for i, spec in enumerate(self.tool_calls):
                if not isinstance(spec.name, str) or not spec.name:
                    raise ValueError(f"structured_outputs.tool_calls.{i}.name must be a non-empty string")
                if spec.parameters is not None and not isinstance(spec.parameters, Mapping):
                    raise ValueError(f"structured_outputs.tool_calls.{i}.parameters must be a JSON Schema object")

    def kinds(self) -> list[str]:
        """The constraint fields that are set (exactly one on a valid instance)."""
        names = ("json", "json_object", "regex", "grammar", "choice", "tool_calls")
        return [n for n in names if getattr(self, n) is not None]


@dataclass
class SamplingParams:
    """Per-request sampling settings.

    `temperature == 0` means greedy. `top_k` of 0 or -1 disables top-k; `top_p == 1` and
    `min_p == 0` disable those filters. Penalties follow vLLM/OpenAI semantics: presence and
    frequency penalties act on generated tokens; the repetition penalty (CTRL-style: divide
    positive logits, multiply negative ones) acts on prompt and generated tokens.

    Logits processors (applied by the engine, batched, in vLLM's order): `structured_outputs`
    masks, then `allowed_token_ids`, `bad_words`, `min_tokens` (stop ids masked) and
    `logit_bias`, then penalties and temperature. `logprobs` / `prompt_logprobs` are the model's
    raw log-probs (vLLM's default `logprobs_mode="raw_logprobs"`): taken before every processor
    except the structured-output mask, which vLLM's model runner also applies first.
    `prompt_logprobs` disables the prefix cache for the sequence that computes them.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Logits processors (applied by the engine, batched): token id -> bias added to its logit;
    # the only ids that may be sampled; words that must not be generated; a grammar.
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if isinstance(self.structured_outputs, Mapping):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        if self.n < 1:
            raise bad("n", "must be >= 1")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "must be -1 or 0 (disabled) or >= 1")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be >= 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad("logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise bad("prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        self._validate_processors()

    def _validate_processors(self) -> None:
        """Vocabulary bounds are checked by the engine, which knows the vocabulary size."""
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise ValueError(f"logit_bias must map token ids to floats, got {self.logit_bias!r}")
            for key, value in self.logit_bias.items():
                if isinstance(key, bool) or not isinstance(key, int) or key < 0:
                    raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got key {key!r}")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"logit_bias[{key}] must be a finite number, got {value!r}")
                if abs(value) > LOGIT_BIAS_LIMIT:
                    raise ValueError(f"logit_bias[{key}] must be in [-100, 100], got {value!r}")
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not ids or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
                raise ValueError(f"allowed_token_ids must be a non-empty list of token ids (ints >= 0), got {ids!r}")
        if self.bad_words is not None:
            if any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
                raise ValueError(f"bad_words must be a list of non-blank strings, got {self.bad_words!r}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, gen: Mapping[str, Any], **overrides: Any) -> SamplingParams:
        """Defaults from an HF generation_config, with explicit overrides (None = keep default)."""
        base: dict[str, Any] = {}
        for key in ("temperature", "top_p", "top_k", "repetition_penalty", "min_p"):
            if gen.get(key) is not None:
                base[key] = gen[key]
        if gen.get("do_sample") is False:
            base["temperature"] = 0.0
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)
