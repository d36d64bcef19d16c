"""Generate every sample of an eval in one engine batch, saving each as soon as it finishes.

`make_generator` is the one place that picks the generation backend:

* `engine` — the paged engine with continuous batching: `qwenkit.engine.llm.LLM` when it exists
  (its `llm_engine` is driven step by step, which is what `LLM.generate` does, so finished
  samples can be saved and counted while the rest keep running), else `LLMEngine` directly;
* `simple` — `qwenkit.generate.generate`, one sequence at a time (the slow reference loop).

`SampleStore` is the resumable JSONL file: a header line with the run's settings, then one line
per finished sample; a rerun skips what is already there (and refuses a file made with other
settings).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol as TypingProtocol, Sequence

from qwenkit.errors import QwenkitError
from qwenkit.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "engine", "simple")


@dataclass
class Completion:
    text: str
    num_tokens: int
    finish_reason: str | None


OnOutput = Callable[[int, Completion], None]


class Generator(TypingProtocol):
    name: str

    def generate(
        self, prompts: Sequence[list[int]], params: Sequence[SamplingParams], on_output: OnOutput
    ) -> None:
        """Generate one completion per prompt; call `on_output(i, completion)` as each ends."""


class EngineGenerator:
    name = "engine"

    def __init__(self, loaded: Any, **engine_args: Any) -> None:
        try:
            from qwenkit.engine.llm import LLM
        except ImportError:
            LLM = None
        if LLM is not None:
            self.llm = LLM(loaded, **engine_args)
            self.engine = getattr(self.llm, "llm_engine", None)
        else:
            from qwenkit.engine.llm_engine import LLMEngine

            self.llm = None
            self.engine = LLMEngine(
                loaded.model, loaded.tokenizer, generation_defaults=loaded.generation_defaults, **engine_args
            )

    def generate(
        self, prompts: Sequence[list[int]], params: Sequence[SamplingParams], on_output: OnOutput
    ) -> None:
        if self.engine is None:  # an LLM without a steppable engine: one generate() call
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], list(params))
            for i, out in enumerate(outs):
                on_output(i, _completion(out))
            return
        from qwenkit.engine.outputs import RequestOutputKind

        for i, (ids, sp) in enumerate(zip(prompts, params)):
            self.engine.add_request(str(i), {"prompt_token_ids": ids}, sp, output_kind=RequestOutputKind.FINAL_ONLY)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    on_output(int(out.request_id), _completion(out))


def _completion(out: Any) -> Completion:
    o = out.outputs[0]
    return Completion(o.text, len(o.token_ids), o.finish_reason)


class SimpleGenerator:
    name = "simple"

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded

    def generate(
        self, prompts: Sequence[list[int]], params: Sequence[SamplingParams], on_output: OnOutput
    ) -> None:
        from qwenkit.generate import generate

        lm = self.loaded
        for i, (ids, sp) in enumerate(zip(prompts, params)):
            ev = generate(lm.model, lm.tokenizer, ids, sp, lm.config.eos_token_ids)
            on_output(i, Completion(ev.text, len(ev.token_ids), ev.finish_reason))


def make_generator(loaded: Any, backend: str = "auto", **engine_args: Any) -> Generator:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend in ("auto", "engine"):
        try:
            return EngineGenerator(loaded, **engine_args)
        except ImportError as e:
            if backend == "engine":
                raise
            logger.warning("paged engine unavailable (%s); using the simple generation loop", e)
    return SimpleGenerator(loaded)


@dataclass
class Sample:
    task_id: str
    index: int  # sample number within the task (0 .. n-1)
    completion: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_tokens: int


class SampleStore:
    """Append-only JSONL of finished samples, keyed by (task_id, index)."""

    def __init__(self, path: str | os.PathLike[str], meta: Mapping[str, Any], overwrite: bool = False) -> None:
        self.path = Path(path)
        self.meta = dict(meta)
        self.samples: dict[tuple[str, int], Sample] = {}
        if self.path.exists() and not overwrite:
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"_meta": self.meta}) + "\n")

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        if not lines:
            raise QwenkitError(f"{self.path}: empty samples file (delete it or pass --overwrite)")
        head = json.loads(lines[0]).get("_meta")
        if head != self.meta:
            diff = {k: (head.get(k) if head else None, v) for k, v in self.meta.items() if not head or head.get(k) != v}
            raise QwenkitError(
                f"{self.path} was made with other settings {diff} (file, now); "
                "pass --overwrite to start over or choose another --samples path"
            )
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s: skipping a truncated line", self.path)
                continue
            s = Sample(**rec)
            self.samples[(s.task_id, s.index)] = s
        logger.info("resuming: %d samples already in %s", len(self.samples), self.path)

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self.samples

    def add(self, sample: Sample) -> None:
        self.samples[(sample.task_id, sample.index)] = sample
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(sample), ensure_ascii=False) + "\n")


@dataclass
class GenerationStats:
    backend: str
    num_generated: int  # samples generated by this run (not resumed)
    num_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else 0.0


def generate_samples(
    generator: Generator,
    store: SampleStore,
    requests: Sequence[tuple[str, int, list[int], SamplingParams]],
    progress: bool = True,
) -> GenerationStats:
    """Generate the `(task_id, index, prompt_ids, params)` requests missing from `store`."""
    todo = [r for r in requests if (r[0], r[1]) not in store]
    stats = GenerationStats(generator.name, 0, 0, 0.0)
    if not todo:
        return stats
    from tqdm import tqdm

    bar = tqdm(total=len(requests), initial=len(requests) - len(todo), desc="generate", unit="sample",
               dynamic_ncols=True, disable=not progress)  # fmt: skip
    t0 = time.perf_counter()

    def on_output(i: int, c: Completion) -> None:
        task_id, index, ids, _ = todo[i]
        store.add(Sample(task_id, index, c.text, c.finish_reason, len(ids), c.num_tokens))
        stats.num_generated += 1
        stats.num_tokens += c.num_tokens
        elapsed = time.perf_counter() - t0
        bar.set_postfix_str(f"{stats.num_tokens / elapsed:.1f} tok/s", refresh=False)
        bar.update()

    try:
        generator.generate([r[2] for r in todo], [r[3] for r in todo], on_output)
    finally:
        stats.seconds = time.perf_counter() - t0
        bar.close()
    return stats
