"""qwenkit's own datatrove pipeline steps (what datatrove does not have).

* :class:`SourceTreeReader` — one document per file of a folder (datatrove's readers parse record
  files — JSONL, Parquet, WARC — not source trees), with language by extension and the
  repo-relative path; binary, non-UTF-8, unreadable and oversized files are counted and skipped.
* :class:`Normalize` — unicode NFC + newline normalisation.
* :class:`ProseOnly` — applies a datatrove prose filter (Gopher, C4, FineWeb) to prose documents
  only; code passes through (those rules would drop nearly every source file).
* :class:`CodeQualityFilter` — StarCoder-style rules for code: max / mean line length,
  alphanumeric fraction, auto-generated and minified files.
* :class:`NGramDecontaminator` — drops documents sharing an n-gram (default 13 words), an exact
  prompt or an exact solution with benchmark items, and records every collision (datatrove's n-gram decontamination
  needs lighteval's task registry and does not say which benchmark item collided).
* :class:`DomainClassifier`, :class:`DomainSizeCounter`, :class:`MixSampler` — cheap heuristic
  domain labels (code / math / zh / en / other) and sampling to target ratios.
* :class:`ShardTokenizer` — tokenizes and writes :mod:`qwenkit.data.shards` (EOS after each document).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.utils.typeshelper import StatHints

from qwenkit.data.pipeline.text import PROSE_LANGUAGES, language_of, normalize_text, words

__all__ = [
    "DOMAINS",
    "CodeQualityFilter",
    "DomainClassifier",
    "DomainSizeCounter",
    "MixSampler",
    "NGramDecontaminator",
    "Normalize",
    "ProseOnly",
    "ShardTokenizer",
    "SourceTreeReader",
    "classify_domain",
    "is_code",
]

DOMAINS = ("code", "math", "zh", "en", "other")


def is_code(doc: Document) -> bool:
    """A document is code when its metadata says so (``kind`` or a non-prose ``language``)."""
    kind = doc.metadata.get("kind")
    if kind in ("code", "prose"):
        return kind == "code"
    lang = doc.metadata.get("language")
    return bool(lang) and lang not in PROSE_LANGUAGES and lang not in ("unknown", "en", "zh")


class SourceTreeReader(PipelineStep):
    """Every file under ``data_folder`` (recursively, sorted; rank ``r`` of ``w`` reads files
    ``r, r + w, ...``) as one document: ``id`` and ``metadata["path"]`` = the path relative to the
    folder, ``metadata["language"]`` by extension, ``metadata["kind"]`` code / prose.

    Skipped and counted (stats ``skipped_<why>``): binary (a NUL byte in the first 8 KiB), not
    UTF-8, unreadable, larger than ``max_bytes``, empty. Hidden folders and ``__pycache__`` are not
    entered.
    """

    type = "📖 - READER"
    name = "📂 source tree"

    def __init__(self, data_folder: str | os.PathLike[str], max_bytes: int = 1 << 20,
                 source: str | None = None) -> None:  # fmt: skip
        super().__init__()
        self.data_folder = Path(data_folder)
        self.max_bytes = max_bytes
        self.source = source or self.data_folder.name

    def files(self) -> list[Path]:
        if self.data_folder.is_file():
            return [self.data_folder]
        out = []
        for root, dirs, names in os.walk(self.data_folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
            out.extend(Path(root) / n for n in names)
        return sorted(out)

    def read(self, path: Path) -> str | tuple[None, str]:
        try:
            if path.stat().st_size > self.max_bytes:
                return None, "too_large"
            data = path.read_bytes()
        except OSError:
            return None, "unreadable"
        if not data.strip():
            return None, "empty"
        if b"\0" in data[:8192]:
            return None, "binary"
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_utf8"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        base = self.data_folder.parent if self.data_folder.is_file() else self.data_folder
        for path in self.files()[rank::world_size]:
            self.stat_update("input_files")
            with self.track_time():
                text = self.read(path)
            if isinstance(text, tuple):
                self.stat_update(f"skipped_{text[1]}")
                continue
            rel = path.relative_to(base).as_posix()
            lang = language_of(rel)
            kind = "prose" if lang in PROSE_LANGUAGES or lang == "unknown" else "code"
            self.stat_update("documents")
            doc = Document(text=text, id=f"{self.source}/{rel}",
                           metadata={"path": rel, "source": self.source, "language": lang, "kind": kind})  # fmt: skip
            self.update_doc_stats(doc)
            yield doc


class Normalize(BaseFormatter):
    """Unicode NFC, ``\\n`` newlines, no byte-order mark (:func:`~qwenkit.data.pipeline.text.normalize_text`)."""

    name = "🔤 unicode NFC"

    def format(self, text: str) -> str:
        return normalize_text(text)


class ProseOnly(BaseFilter):
    """Apply ``inner`` (a datatrove filter) to prose documents only; reasons get a ``prefix``."""

    def __init__(self, inner: BaseFilter, prefix: str) -> None:
        super().__init__()
        self.inner = inner
        self.prefix = prefix
        self.name = f"📝 prose-only {type(inner).__name__}"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if is_code(doc):
            return True
        res = self.inner.filter(doc)
        keep, reason = res if isinstance(res, tuple) else (res, None)
        reason = reason or "rule"
        return True if keep else (False, reason if reason.startswith(self.prefix) else f"{self.prefix}_{reason}")


_AUTOGEN = re.compile(r"auto-?generated|generated by|do not edit|don't edit|automatically generated", re.I)


class CodeQualityFilter(BaseFilter):
    """StarCoder-style rules for code documents (prose passes): drop a file with a line longer than
    ``max_line_length``, a mean line length above ``max_mean_line_length`` (minified), an
    alphanumeric fraction under ``min_alnum_fraction``, or an auto-generated marker in its first
    ``autogen_lines`` lines."""

    name = "🧑‍💻 code quality"

    def __init__(self, max_line_length: int = 1000, max_mean_line_length: float = 100.0,
                 min_alnum_fraction: float = 0.25, autogen_lines: int = 5) -> None:  # fmt: skip
        super().__init__()
        self.max_line_length = max_line_length
        self.max_mean_line_length = max_mean_line_length
        self.min_alnum_fraction = min_alnum_fraction
        self.autogen_lines = autogen_lines

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if not is_code(doc):
            return True
        text = doc.text
        lines = text.splitlines() or [""]
        if self.autogen_lines and _AUTOGEN.search("\n".join(lines[: self.autogen_lines])):
            return False, "autogenerated"
        lengths = [len(x) for x in lines]
        if sum(lengths) / len(lengths) > self.max_mean_line_length:
            return False, "minified"
        if max(lengths) > self.max_line_length:
            return False, "max_line_length"
        if text and sum(c.isalnum() for c in text) / len(text) < self.min_alnum_fraction:
            return False, "alnum_fraction"
        return True


def _ngram_hashes(tokens: list[str], n: int) -> set[int]:
    return {hash(" ".join(tokens[i : i + n])) for i in range(len(tokens) - n + 1)}


def _squash(text: str) -> str:
    return " ".join(text.split())


class NGramDecontaminator(BaseFilter):
    """Drop documents that share an ``n``-word n-gram (:func:`~qwenkit.data.pipeline.text.words`)
    or contain the exact (whitespace-squashed) prompt or solution of a benchmark item (those of at
    least ``min_prompt_chars`` characters).

    ``items``: ``(item_id, prompt, solution)`` triples, e.g. ``("humaneval/HumanEval/0", ...)``; the
    n-grams come from prompt + solution. Each collision is written to
    ``report_folder/collisions-<rank>.jsonl`` (document id, item ids, an example n-gram).
    """

    name = "🧪 n-gram decontamination"

    def __init__(self, items: Iterable[tuple[str, str, str]], report_folder: str | os.PathLike[str],
                 n: int = 13, min_prompt_chars: int = 40) -> None:  # fmt: skip
        super().__init__()
        if n < 1:
            raise ValueError(f"decontamination n-gram size must be >= 1, got {n}")
        self.items = [(str(i), str(p or ""), str(s or "")) for i, p, s in items]
        if not self.items:
            raise ValueError("decontamination needs at least one benchmark item")
        self.n = n
        self.min_prompt_chars = min_prompt_chars
        self.report_folder = Path(report_folder)
        self._index: dict[str, list[str]] | None = None
        self._out = None

    def index(self) -> dict[str, list[str]]:
        # keys are the n-gram strings (not hash()): hashes of str differ between processes
        if self._index is None:
            idx: dict[str, list[str]] = {}
            for item_id, prompt, solution in self.items:
                toks = words(prompt + "\n" + solution)
                for i in range(len(toks) - self.n + 1):
                    lst = idx.setdefault(" ".join(toks[i : i + self.n]), [])
                    if not lst or lst[-1] != item_id:
                        lst.append(item_id)
            self._index = idx
            # exact (whitespace-squashed) prompts and solutions: a solution shorter than n words
            # (many of MBPP's) has no n-gram of its own
            self._exact = [(i, kind, t) for i, p, s in self.items for kind, t in (("exact_prompt", _squash(p)),
                           ("exact_solution", _squash(s))) if len(t) >= self.min_prompt_chars]  # fmt: skip
        return self._index

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.report_folder.mkdir(parents=True, exist_ok=True)
        with open(self.report_folder / f"collisions-{rank:05d}.jsonl", "w", encoding="utf-8") as self._out:
            yield from super().run(data, rank, world_size)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        idx = self.index()
        toks = words(doc.text)
        hits: dict[str, str] = {}
        for i in range(len(toks) - self.n + 1):
            gram = " ".join(toks[i : i + self.n])
            for item in idx.get(gram, ()):
                hits.setdefault(item, gram)
        reason = "ngram_overlap"
        if not hits:
            squashed = _squash(doc.text)
            for item_id, kind, t in self._exact:
                if t in squashed:
                    hits.setdefault(item_id, t[:80])
                    reason = kind
        if not hits:
            return True
        if self._out is not None:
            self._out.write(json.dumps({"doc": doc.id, "path": doc.metadata.get("path"), "reason": reason,
                                        "items": sorted(hits), "example": hits[min(hits)]}) + "\n")  # fmt: skip
        return False, reason


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_MATH = re.compile(r"\\(?:frac|sum|int|sqrt|alpha|beta|theta|cdot|leq|geq|mathbb|begin\{(?:equation|align))"
                   r"|\$[^$\n]{1,80}\$|[=+\-*/^]\s*\d|\b(?:theorem|lemma|proof|equation|integer|prime|solve)\b", re.I)  # fmt: skip
_EN_STOP = frozenset("the of and to a in is that for it as with be on this are by or not from".split())
_CODE_LINE = re.compile(r"^\s*(?:def |class |import |from \S+ import|#include|return\b|if \(|for \(|}|{|//|"
                        r"function |var |let |const |public |private |fn |func )")  # fmt: skip


def classify_domain(doc: Document) -> str:
    """code / math / zh / en / other, by cheap rules (no model): code = a code file (metadata) or
    mostly code-looking lines; zh = CJK characters outnumber Latin letters; math = many math marks
    per word; en = Latin text with English stop words."""
    text = doc.text[:20000]
    if is_code(doc):
        return "code"
    lines = [x for x in text.splitlines() if x.strip()]
    if lines and sum(bool(_CODE_LINE.match(x)) for x in lines) / len(lines) > 0.3:
        return "code"
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    if cjk > 0 and cjk >= latin:
        return "zh"
    toks = words(text)
    if toks and len(_MATH.findall(text)) / len(toks) > 0.05:
        return "math"
    if toks and sum(t in _EN_STOP for t in toks) / len(toks) > 0.08:
        return "en"
    return "other"


class DomainClassifier(PipelineStep):
    """Sets ``metadata["domain"]`` (:func:`classify_domain`) and counts documents per domain."""

    type = "🏷️ - CLASSIFY"
    name = "🏷️ domain"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update(StatHints.total)
            with self.track_time():
                doc.metadata["domain"] = d = doc.metadata.get("domain") or classify_domain(doc)
            self.stat_update(f"domain_{d}")
            self.stat_update(f"chars_{d}", value=len(doc.text))
            yield doc


def _size(doc: Document, unit: str) -> int:
    return len(doc.text) if unit == "chars" else 1


class DomainSizeCounter(PipelineStep):
    """Counting pass of the mix: writes ``{domain: size}`` of this rank to ``folder/sizes-<rank>.json``."""

    type = "🏷️ - CLASSIFY"
    name = "🧮 domain sizes"

    def __init__(self, folder: str | os.PathLike[str], unit: str = "chars") -> None:
        super().__init__()
        self.folder = Path(folder)
        self.unit = unit

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        sizes: Counter[str] = Counter()
        for doc in data:
            self.stat_update(StatHints.total)
            sizes[doc.metadata.get("domain") or classify_domain(doc)] += _size(doc, self.unit)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"sizes-{rank:05d}.json.tmp"
        tmp.write_text(json.dumps(dict(sizes)))
        os.replace(tmp, self.folder / f"sizes-{rank:05d}.json")
        return iter(())


def mix_weights(sizes: Mapping[str, int], targets: Mapping[str, float], upsample: bool = False) -> dict[str, float]:
    """Sampling weight per domain so that the output has the ``targets`` ratios.

    Without ``upsample`` the largest output that needs no repetition is chosen (the scarcest
    domain relative to its target is kept whole); with it, the output is as large as the input and
    scarce domains are repeated. Domains without a target get weight 0. Targets of domains with no
    data cannot be met; the remaining targets are renormalised.
    """
    bad = {k: v for k, v in targets.items() if not isinstance(v, (int, float)) or v < 0}
    if bad:
        raise ValueError(f"mix targets must be non-negative numbers, got {bad}")
    present = {d: float(t) for d, t in targets.items() if t > 0 and sizes.get(d, 0) > 0}
    if not present:
        raise ValueError(f"no domain with a positive target has data (targets {dict(targets)}, sizes {dict(sizes)})")
    z = sum(present.values())
    present = {d: t / z for d, t in present.items()}
    total = sum(sizes.values()) if upsample else min(sizes[d] / t for d, t in present.items())
    return {d: (total * present[d] / sizes[d] if d in present else 0.0) for d in sizes}


def _unit_random(key: str, seed: int) -> float:
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


class MixSampler(PipelineStep):
    """Emit each document ``floor(w)`` times plus once more with probability ``frac(w)``, ``w`` its
    domain's weight (a deterministic hash of id and ``seed`` decides, so reruns agree). Stats
    ``out_<domain>`` count output size in ``unit``."""

    type = "🎚️ - MIX"
    name = "🎚️ mix"

    def __init__(self, weights: Mapping[str, float], unit: str = "chars", seed: int = 0) -> None:
        super().__init__()
        self.weights = dict(weights)
        self.unit = unit
        self.seed = seed

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update(StatHints.total)
            d = doc.metadata.get("domain") or classify_domain(doc)
            doc.metadata["domain"] = d
            w = self.weights.get(d, 0.0)
            copies = int(w) + (_unit_random(str(doc.id), self.seed) < w - int(w))
            if not copies:
                self.stat_update(StatHints.dropped, "dropped_sampled_out" if w else "dropped_domain_not_in_mix")
            for k in range(copies):
                self.stat_update(StatHints.forwarded)
                self.stat_update(f"out_{d}", value=_size(doc, self.unit))
                if k == 0:
                    yield doc
                else:
                    yield Document(text=doc.text, id=f"{doc.id}#{k}", metadata={**doc.metadata, "repeat": k})


class ShardTokenizer(PipelineStep):
    """Tokenize each document (``tokenizer_loader()`` gives the tokenizer, called once per worker),
    append ``<|endoftext|>`` and write :mod:`qwenkit.data.shards` shards ``<rank>-<k>`` of at most
    ``max_tokens_per_shard`` tokens into ``output_folder``. A document-count summary per source goes
    to ``.sources/<rank>.json`` for the dataset manifest."""

    type = "🔢 - TOKENIZER"
    name = "🔢 tokenize + shard"

    def __init__(self, output_folder: str | os.PathLike[str], tokenizer_loader: Callable[[], Any],
                 tokenizer_name: str, max_tokens_per_shard: int = 1 << 28, batch_size: int = 64) -> None:  # fmt: skip
        super().__init__()
        self.output_folder = Path(output_folder)
        self.tokenizer_loader = tokenizer_loader
        self.tokenizer_name = tokenizer_name
        self.max_tokens_per_shard = max_tokens_per_shard
        self.batch_size = batch_size

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from datatrove.utils.batching import batched

        from qwenkit.data.shards import ShardWriter

        tok = self.tokenizer_loader()
        eos = tok.token_to_id("<|endoftext|>")
        if eos is None:
            eos = tok.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {self.tokenizer_name!r} has no <|endoftext|> / EOS token")
        for old in self.output_folder.glob(f"{rank:05d}-*.json"):  # a rerun of this rank starts over
            old.unlink()
        sources: dict[str, dict[str, int]] = {}
        k, writer = 0, None
        for batch in batched(data or (), self.batch_size):
            with self.track_time("batch"):
                ids = tok.encode_batch([d.text for d in batch])
            for doc, doc_ids in zip(batch, ids):
                doc_ids = list(doc_ids) + [eos]
                if writer is not None and writer.num_tokens + len(doc_ids) > self.max_tokens_per_shard:
                    writer.close()
                    writer, k = None, k + 1
                if writer is None:
                    writer = ShardWriter(self.output_folder, f"{rank:05d}-{k:04d}", vocab_size=tok.vocab_size,
                                         tokenizer=self.tokenizer_name)  # fmt: skip
                writer.append(doc_ids)
                self.stat_update(StatHints.total)
                self.stat_update("tokens", value=len(doc_ids))
                s = sources.setdefault(str(doc.metadata.get("source", "")), {"documents": 0, "tokens": 0})
                s["documents"] += 1
                s["tokens"] += len(doc_ids)
        if writer is not None:
            writer.close()
        (self.output_folder / ".sources").mkdir(exist_ok=True)
        (self.output_folder / ".sources" / f"{rank:05d}.json").write_text(json.dumps(sources))
        return iter(())
