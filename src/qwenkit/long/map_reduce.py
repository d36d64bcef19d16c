"""Map-reduce over a document longer than the model reads well at once (the Qwen2.5 report's
recipe: overlapping 1,024-token segments processed in parallel, then joined).

Map: the text is tokenized once and cut on token boundaries into segments of `segment` tokens
that overlap by `overlap`; every segment becomes one chat prompt (the task + the segment) and all
of them go through the engine as one batch. Reduce: the partial answers are joined into one final
prompt. When the joined partials exceed `segment` tokens they are first grouped (at least two per
group, each group within the budget when possible) and every group is reduced as one batch, level
after level, so the number of partials shrinks each round until one prompt holds them all.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

MAP_PROMPT = "{task}\n\nThis is part {index} of {count} of a longer document:\n\n{segment}"
REDUCE_PROMPT = (
    "{task}\n\nThe document was too long to read at once. These are the answers for its "
    "consecutive parts, in order:\n\n{partials}\n\nCombine them into one answer for the whole document."
)


def split_segments(num_tokens: int, segment: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) token spans of at most `segment` tokens, each starting `segment - overlap`
    after the previous one, the last ending at `num_tokens` (it may overlap more)."""
    if segment < 1:
        raise ValueError(f"segment must be >= 1 token, got {segment}")
    if not 0 <= overlap < segment:
        raise ValueError(f"overlap must be in [0, segment={segment}), got {overlap}")
    if num_tokens <= segment:
        return [(0, num_tokens)] if num_tokens else []
    step = segment - overlap
    spans = []
    start = 0
    while start + segment < num_tokens:
        spans.append((start, start + segment))
        start += step
    spans.append((start, num_tokens))
    return spans


@dataclass
class MapReduceResult:
    answer: str
    spans: list[tuple[int, int]]  # the map segments' token spans
    levels: list[list[str]] = field(default_factory=list)  # level 0: one answer per segment; then each reduce round
    num_prompts: int = 0
    num_batches: int = 0


def _group(partials: list[str], lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of partial indices, each within `budget` tokens where possible and of
    at least two partials (so every round shrinks the list)."""
    groups: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if len(groups[-1]) >= 2 and used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    if len(groups) > 1 and len(groups[-1]) < 2:
        groups[-2].extend(groups.pop())
    return groups


def map_reduce(
    llm: Any,
    text: str,
    task: str,
    segment: int = 1024,
    overlap: int = 256,
    sampling_params: Any = None,
    use_tqdm: bool = False,
) -> MapReduceResult:
    """Answer `task` about `text` through `llm` (a `qwenkit.LLM`, or anything with
    `get_tokenizer()` and a batched `chat(conversations, params, use_tqdm=)`).

    `segment` / `overlap` are in tokens of the model's tokenizer; the final reduce prompt, and
    every intermediate one, holds at most `segment` tokens of partial answers unless a single
    pair of partials is already longer.
    """
    tok = llm.get_tokenizer()
    if tok is None:
        raise ValueError("map_reduce needs the model's tokenizer (LLM built without one)")
    if not text.strip():
        raise ValueError("map_reduce: the text is empty")
    ids = tok.encode(text)
    spans = split_segments(len(ids), segment, overlap)
    result = MapReduceResult("", spans)

    def run(prompts: list[str]) -> list[str]:
        convs = [[{"role": "user", "content": p}] for p in prompts]
        outs = llm.chat(convs, sampling_params, use_tqdm=use_tqdm)
        result.num_prompts += len(prompts)
        result.num_batches += 1
        return [o.outputs[0].text.strip() for o in outs]

    pieces = [tok.decode(ids[a:b]) for a, b in spans]
    logger.info("map: %d tokens in %d segments of <= %d (overlap %d)", len(ids), len(spans), segment, overlap)
    partials = run([MAP_PROMPT.format(task=task, index=i + 1, count=len(pieces), segment=p)
                    for i, p in enumerate(pieces)])  # fmt: skip
    result.levels.append(partials)
    if len(partials) == 1:
        result.answer = partials[0]
        return result

    def joined(group: list[str]) -> str:
        return "\n\n".join(f"Part {i + 1}:\n{p}" for i, p in enumerate(group))

    while True:
        lengths = [len(tok.encode(p)) + 4 for p in partials]  # + the "Part i:" label
        if sum(lengths) <= segment or len(partials) <= 2:
            result.answer = run([REDUCE_PROMPT.format(task=task, partials=joined(partials))])[0]
            result.levels.append([result.answer])
            return result
        groups = _group(partials, lengths, segment)
        logger.info("reduce: %d partials (%d tokens) in %d groups", len(partials), sum(lengths), len(groups))
        partials = run([REDUCE_PROMPT.format(task=task, partials=joined([partials[i] for i in g])) for g in groups])
        result.levels.append(partials)
