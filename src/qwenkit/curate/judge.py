"""The LLM judge: qwenkit's engine scores each sample's relevance (R), informativeness (I) and
toxicity (T), 0-10, as JSON constrained by a schema (the engine's structured output, xgrammar),
batched through continuous batching. A sample is kept when ``w_R*R + w_I*I + w_T*T > threshold``
on scores scaled to [0, 1] (the Qwen2.5 report's rule: 0.7, 0.3, -0.5 and 0.8); the scores go
into ``metadata["judge"]``."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

__all__ = ["JUDGE_SCHEMA", "DEFAULT_WEIGHTS", "JudgeFilter", "judge_keep", "judge_prompt", "parse_scores"]

logger = logging.getLogger(__name__)

_FIELDS = ("relevance", "informativeness", "toxicity")
JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {k: {"type": "integer", "minimum": 0, "maximum": 10} for k in _FIELDS},
    "required": list(_FIELDS),
    "additionalProperties": False,
}
DEFAULT_WEIGHTS = {"relevance": 0.7, "informativeness": 0.3, "toxicity": -0.5}
DEFAULT_THRESHOLD = 0.8
# the 0.5B answers 10/10/10 (or echoes the rubric's anchors) whatever the sample; the 1.5B separates
# code from spam and abuse (docs/benchmarks.md, Data pipeline: Judge)
DEFAULT_JUDGE_MODEL = "qwen2.5-coder-1.5b-instruct"

_RUBRIC = (
    "You are a data quality judge for training a language model. Rate the sample below from 0 to 10 on:\n"
    "- relevance: is it coherent, meaningful text or code worth learning from (10 = highly)?\n"
    "- informativeness: does it teach facts, reasoning or useful code (10 = very informative)?\n"
    "- toxicity: is it hateful, harassing, sexual or violent (0 = not at all, 10 = extremely)?\n"
    'Answer with JSON only: {"relevance": R, "informativeness": I, "toxicity": T}.\n\nSample:\n'
)


def judge_prompt(tokenizer: Any, text: str, max_chars: int = 2000) -> str:
    """The rubric + the sample (cut to ``max_chars``) as a chat prompt for the model."""
    msg = _RUBRIC + text[:max_chars]
    return tokenizer.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip


def parse_scores(text: str) -> dict[str, int]:
    """The three scores from the judge's JSON; ``ValueError`` naming the field when one is missing
    or out of 0-10."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"judge output is not JSON ({e}): {text[:200]!r}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"judge output is not a JSON object: {text[:200]!r}")
    out = {}
    for k in _FIELDS:
        v = obj.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 10:
            raise ValueError(f"judge output field {k!r} must be an integer 0-10, got {v!r}")
        out[k] = v
    return out


def judge_keep(scores: Mapping[str, int], weights: Mapping[str, float] = DEFAULT_WEIGHTS,
               threshold: float = DEFAULT_THRESHOLD) -> tuple[bool, float]:  # fmt: skip
    """(keep, value): value = sum of weight * score / 10; keep when value > threshold."""
    value = sum(float(weights.get(k, 0.0)) * scores[k] / 10 for k in _FIELDS)
    return value > threshold, value


class JudgeFilter(BaseFilter):
    """Batched LLM judge as a datatrove filter. ``llm_factory()`` builds the engine's ``LLM`` once
    per worker. Drop reasons: ``judge_below_threshold``, ``judge_unparsable``. Per-sample scores
    go to ``scores_folder/scores-<rank>.jsonl`` for the report's histograms."""

    name = "⚖️ LLM judge"

    def __init__(self, llm_factory: Any, scores_folder: str | Path, weights: Mapping[str, float] | None = None,
                 threshold: float = DEFAULT_THRESHOLD, batch_size: int = 32, max_chars: int = 2000,
                 max_tokens: int = 48) -> None:  # fmt: skip
        super().__init__(batch_size=batch_size)
        self.llm_factory = llm_factory
        self.scores_folder = Path(scores_folder)
        self.weights = dict(weights or DEFAULT_WEIGHTS)
        unknown = set(self.weights) - set(_FIELDS)
        if unknown:
            raise ValueError(f"judge weights: unknown score(s) {sorted(unknown)}; known: {list(_FIELDS)}")
        self.threshold = threshold
        self.max_chars = max_chars
        self.max_tokens = max_tokens
        self._llm = None
        self._out = None

    def run(self, data: Any, rank: int = 0, world_size: int = 1) -> Any:
        self.scores_folder.mkdir(parents=True, exist_ok=True)
        with open(self.scores_folder / f"scores-{rank:05d}.jsonl", "w", encoding="utf-8") as self._out:
            yield from super().run(data, rank, world_size)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        from qwenkit.sampling_params import SamplingParams, StructuredOutputsParams

        if self._llm is None:
            self._llm = self.llm_factory()
        tok = self._llm.get_tokenizer()
        params = SamplingParams(temperature=0.0, max_tokens=self.max_tokens,
                                structured_outputs=StructuredOutputsParams(json=JUDGE_SCHEMA))  # fmt: skip
        t0 = time.perf_counter()
        outs = self._llm.generate([judge_prompt(tok, d.text, self.max_chars) for d in batch], params, use_tqdm=False)
        self.stat_update("judge_seconds_x1000", value=int(1000 * (time.perf_counter() - t0)))
        res: list[bool | tuple[bool, str]] = []
        for doc, o in zip(batch, outs):
            text = o.outputs[0].text
            try:
                scores = parse_scores(text)
            except ValueError as e:
                logger.warning("%s: %s", doc.id, e)
                doc.metadata["judge"] = {"raw": text, "error": str(e)}
                res.append((False, "judge_unparsable"))
                continue
            keep, value = judge_keep(scores, self.weights, self.threshold)
            doc.metadata["judge"] = {**scores, "value": round(value, 4)}
            if self._out is not None:
                self._out.write(json.dumps({"doc": doc.id, **scores, "value": value, "keep": keep}) + "\n")
            res.append(True if keep else (False, "judge_below_threshold"))
        return res


def _make_llm(model: str, quantization: str | None, max_num_seqs: int) -> Any:
    from qwenkit.engine.llm import LLM

    return LLM(model, quantization=quantization or "auto", max_num_seqs=max_num_seqs)


def run_judge_stage(inp: Path, out: Path, opts: Mapping[str, Any], exe: Any) -> dict[str, Any]:
    """The ``judge`` stage: options ``model``, ``weights``, ``threshold``, ``batch_size``,
    ``max_chars``, ``quantization``. Report: kept / dropped, samples/s, histograms of R / I / T."""
    from functools import partial

    from qwenkit.curate import stages

    batch = int(opts.get("batch_size") or 32)
    factory = opts.get("llm_factory") or partial(_make_llm, str(opts.get("model") or DEFAULT_JUDGE_MODEL),
                                                  opts.get("quantization"), batch)  # fmt: skip
    step = JudgeFilter(factory, out / "scores", weights=opts.get("weights"),
                       threshold=float(opts.get("threshold") if opts.get("threshold") is not None else DEFAULT_THRESHOLD),
                       batch_size=batch, max_chars=int(opts.get("max_chars") or 2000))  # fmt: skip
    rep = stages._simple("judge", inp, out, [step], exe)
    rows = []
    for f in sorted((out / "scores").glob("scores-*.jsonl")):
        rows += [json.loads(x) for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]
    hist = {k: [sum(r[k] == v for r in rows) for v in range(11)] for k in _FIELDS}
    judge_s = rep["steps"][1]["counts"].get("judge_seconds_x1000", 0) / 1000
    rep.update(model=str(opts.get("model") or DEFAULT_JUDGE_MODEL), weights=step.weights, threshold=step.threshold,
               scored=len(rows), judge_seconds=judge_s,
               samples_per_s=round(len(rows) / judge_s, 3) if judge_s else None, histograms=hist)  # fmt: skip
    (out / stages.REPORT).write_text(json.dumps(rep, indent=1, default=str) + "\n")
    return rep
