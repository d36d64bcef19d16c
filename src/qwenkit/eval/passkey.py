"""Passkey retrieval: a 5-digit key hidden in garbage text at a chosen depth (Mohtashami & Jaggi,
"Landmark Attention", as used by LongLoRA / YaRN / StreamingLLM evaluations).

The prompt is built from token ids of the model's own tokenizer so that its length is exact:
task description + garbage (the sentence unit repeated) with the key sentence inserted at
`depth` (0 = right after the description, 1 = right before the question; snapped to the nearest
garbage-unit boundary) + the question. Generation is greedy; a sample passes when the first run of
digits in the decoded continuation equals the key.
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

logger = logging.getLogger(__name__)

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
GARBAGE = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
_DIGITS = re.compile(r"\d+")


def parse_length(text: str) -> int:
    """'4k' -> 4096, '8K' -> 8192, '1500' -> 1500 (tokens)."""
    s = text.strip().lower()
    try:
        n = int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)
    except ValueError:
        raise ValueError(f"--lengths: {text!r} is not a token count such as 4096 or 4k") from None
    if n < 1:
        raise ValueError(f"--lengths: {text!r} must be positive")
    return n


def parse_depths(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        try:
            d = float(part)
        except ValueError:
            raise ValueError(f"--depths: {part!r} is not a number in [0, 1]") from None
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"--depths: {d} is outside [0, 1]")
        out.append(d)
    return out


def build_prompt(tokenizer: Any, length: int, depth: float, key: str) -> tuple[list[int], int]:
    """Token ids of exactly `length` tokens and the token index where the key sentence starts."""
    head = tokenizer.encode(TASK)
    needle = tokenizer.encode(NEEDLE.format(key=key))
    tail = tokenizer.encode(QUESTION)
    unit = tokenizer.encode(GARBAGE)
    n_garbage = length - len(head) - len(needle) - len(tail)
    if n_garbage < 0:
        raise ValueError(
            f"passkey length {length} is too short: the description, key sentence and question "
            f"alone take {length - n_garbage} tokens"
        )
    garbage = (unit * (n_garbage // len(unit) + 1))[:n_garbage]
    # the garbage-unit boundary (or the garbage's end) nearest to the depth
    at = min([*range(0, n_garbage, len(unit)), n_garbage], key=lambda b: abs(b - depth * n_garbage))
    ids = head + garbage[:at] + needle + garbage[at:] + tail
    assert len(ids) == length
    return ids, len(head) + at


def score(text: str, key: str) -> bool:
    m = _DIGITS.search(text)
    return m is not None and m.group(0) == key


@dataclass
class PasskeySample:
    length: int
    depth: float
    key: str
    needle_position: int
    output: str
    passed: bool


@dataclass
class PasskeyResult:
    lengths: list[int]
    depths: list[float]
    samples: list[PasskeySample] = field(default_factory=list)

    def accuracy(self, length: int | None = None, depth: float | None = None) -> float:
        rows = [s for s in self.samples
                if (length is None or s.length == length) and (depth is None or s.depth == depth)]  # fmt: skip
        return sum(s.passed for s in rows) / len(rows) if rows else float("nan")

    def table(self) -> str:
        """Accuracy per depth (rows) and length (columns), then the overall score."""
        head = "depth \\ length" + "".join(f"{n:>9d}" for n in self.lengths)
        lines = [head, "-" * len(head)]
        for d in self.depths:
            lines.append(f"{d:<14.2f}" + "".join(f"{100 * self.accuracy(n, d):>8.0f}%" for n in self.lengths))
        lines.append(f"{'all':<14}" + "".join(f"{100 * self.accuracy(n):>8.0f}%" for n in self.lengths))
        lines.append(f"overall: {100 * self.accuracy():.1f}% of {len(self.samples)} samples")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "lengths": self.lengths,
            "depths": self.depths,
            "accuracy": self.accuracy(),
            "by_length": {str(n): self.accuracy(n) for n in self.lengths},
            "by_length_depth": {f"{n}@{d}": self.accuracy(n, d) for n in self.lengths for d in self.depths},
            "samples": [asdict(s) for s in self.samples],
        }


def run_passkey(
    llm: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    num_samples: int = 1,
    seed: int = 0,
    max_tokens: int = 12,
    use_tqdm: bool = True,
) -> PasskeyResult:
    """Every (length, depth, sample) prompt in one `llm.generate` batch, greedy; `llm` is a
    `qwenkit.LLM` (its engine options — window, sinks, RoPE scaling — apply as constructed)."""
    from qwenkit.sampling_params import SamplingParams

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    tok = llm.get_tokenizer()
    rng = random.Random(seed)
    cases = []
    for n in lengths:
        for d in depths:
            for _ in range(num_samples):
                key = str(rng.randint(10000, 99999))
                ids, pos = build_prompt(tok, n, d, key)
                cases.append((n, d, key, pos, ids))
    logger.info("passkey: %d prompts (%s tokens x %d depths x %d)", len(cases),
                ",".join(map(str, lengths)), len(depths), num_samples)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = llm.generate([{"prompt_token_ids": c[4]} for c in cases], params, use_tqdm=use_tqdm)
    result = PasskeyResult(list(lengths), list(depths))
    for (n, d, key, pos, _), out in zip(cases, outs):
        text = out.outputs[0].text
        result.samples.append(PasskeySample(n, d, key, pos, text, score(text, key)))
    return result


def passkey(
    model: Any,
    lengths: Sequence[int] = (4096,),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    num_samples: int = 1,
    seed: int = 0,
    max_tokens: int = 12,
    use_tqdm: bool = True,
    **engine_kwargs: Any,
) -> PasskeyResult:
    """Build `qwenkit.LLM(model, **engine_kwargs)` (max_model_len defaults to the longest prompt
    plus `max_tokens`) and run `run_passkey` on it."""
    from qwenkit.engine.llm import LLM

    engine_kwargs.setdefault("max_model_len", max(lengths) + max_tokens)
    llm = LLM(model, **engine_kwargs)
    return run_passkey(llm, lengths, depths, num_samples, seed, max_tokens, use_tqdm)
