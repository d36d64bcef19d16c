"""The pipeline's stages: each reads a folder, writes a new one (``OUT/data/<rank>.jsonl.gz``, or
shards for ``tokenize``) plus ``OUT/report.json`` with documents in / out and the counts by
reason; it never writes into its input. Each stage is one or more datatrove jobs whose completed
tasks are recorded under ``OUT/.logs``: a rerun skips them.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from qwenkit.data.pipeline.run import ExecutorConfig, job_counts, run_job
from qwenkit.errors import DataError

__all__ = ["STAGES", "run_stage", "stage_input_files"]

logger = logging.getLogger(__name__)

REPORT = "report.json"


# ---------------------------------------------------------------------------------------- helpers
def stage_input_files(inp: Path) -> tuple[Path, list[str]]:
    """The folder of JSONL documents a stage reads (a stage's ``data/`` or a user folder) and its files."""
    folder = inp / "data" if (inp / "data").is_dir() and (inp / REPORT).is_file() else inp
    if not folder.is_dir():
        raise DataError(f"{inp}: not a folder of JSONL documents (the output of a previous stage)")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jsonl*") if p.is_file())
    if not files:
        raise DataError(f"{folder}: no *.jsonl / *.jsonl.gz files")
    return folder, files


def _reader(inp: Path, text_key: str = "text") -> tuple[Any, int]:
    from datatrove.pipeline.readers import JsonlReader

    folder, files = stage_input_files(inp)
    return JsonlReader(str(folder), glob_pattern="**/*.jsonl*", text_key=text_key,
                       add_file_path=False), len(files)  # fmt: skip


def _writer(folder: Path) -> Any:
    from datatrove.pipeline.writers import JsonlWriter

    return JsonlWriter(str(folder), output_filename="${rank}.jsonl.gz")


def _check_out(inp: Path, out: Path) -> None:
    i, o = inp.resolve(), out.resolve()
    if i == o or o in i.parents or i in o.parents:
        raise DataError(f"output {out} must not be the input {inp}, inside it or around it (inputs are never modified)")


def _merge_counts(jobs: list[list[dict[str, Any]]]) -> tuple[dict[str, int], dict[str, int]]:
    dropped: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for steps in jobs:
        for s in steps:
            for k, v in s["counts"].items():
                if k.startswith("dropped_"):
                    dropped[k[len("dropped_"):]] += v
                elif k.startswith("skipped_"):
                    skipped[k[len("skipped_"):]] += v
    return dict(dropped), dict(skipped)


def _report(stage: str, inp: Path, out: Path, wall: float, jobs: list[list[dict[str, Any]]], docs_in: int,
            docs_out: int, **extra: Any) -> dict[str, Any]:  # fmt: skip
    dropped, skipped = _merge_counts(jobs)
    rep = {"stage": stage, "input": str(inp), "output": str(out), "docs_in": docs_in, "docs_out": docs_out,
           "dropped": dropped, "skipped": skipped, "wall_s": round(wall, 3),
           "docs_per_s": round(docs_in / wall, 1) if wall > 0 else None, **extra,
           "steps": [s for steps in jobs for s in steps]}  # fmt: skip
    (out / REPORT).write_text(json.dumps(rep, indent=1, default=str) + "\n")
    logger.info("%s: %d docs in, %d out, dropped %s, skipped %s (%.1fs)", stage, docs_in, docs_out, dropped,
                skipped, wall)  # fmt: skip
    return rep


def _count(steps: list[dict[str, Any]], i: int, key: str) -> int:
    return int(steps[i]["counts"].get(key, 0)) if steps and len(steps) > i else 0


def _simple(stage: str, inp: Path, out: Path, middle: list[Any], exe: ExecutorConfig, **extra: Any) -> dict[str, Any]:
    reader, tasks = _reader(inp)
    logs = out / ".logs" / stage
    wall = run_job([reader, *middle, _writer(out / "data")], tasks, logs, exe)
    steps = job_counts(logs)
    return _report(stage, inp, out, wall, [steps], _count(steps, 0, "documents"), _count(steps, -1, "total"), **extra)


# ----------------------------------------------------------------------------------------- stages
def stage_read(inp: Path, out: Path, opts: Mapping[str, Any], exe: ExecutorConfig) -> dict[str, Any]:
    """Raw files -> documents. ``format``: auto (JSONL/Parquet when every file is one, else a source
    tree), jsonl, parquet, source. ``text_key`` for records; ``max_bytes`` per source file."""
    from datatrove.pipeline.readers import JsonlReader, ParquetReader

    from qwenkit.data.pipeline.steps import SourceTreeReader

    if not inp.exists():
        raise DataError(f"{inp}: no such file or folder")
    fmt = opts.get("format", "auto")
    files = [inp] if inp.is_file() else [p for p in inp.rglob("*") if p.is_file()]
    if fmt == "auto":
        names = [p.name for p in files]
        if names and all(n.endswith((".jsonl", ".jsonl.gz")) for n in names):
            fmt = "jsonl"
        elif names and all(n.endswith(".parquet") for n in names):
            fmt = "parquet"
        else:
            fmt = "source"
    source = opts.get("source") or inp.name
    if fmt == "source":
        tasks = int(opts.get("tasks") or max(1, exe.workers))
        reader: Any = SourceTreeReader(inp, max_bytes=int(opts.get("max_bytes", 1 << 20)), source=source)
    elif fmt in ("jsonl", "parquet"):
        cls = JsonlReader if fmt == "jsonl" else ParquetReader
        folder, glob = (inp.parent, inp.name) if inp.is_file() else (inp, None)
        reader = cls(str(folder), glob_pattern=glob, text_key=opts.get("text_key", "text"),
                     default_metadata={"source": source, **({"kind": opts["kind"]} if opts.get("kind") else {})})  # fmt: skip
        tasks = len(files)
    else:
        raise DataError(f"read: format must be auto, jsonl, parquet or source, got {fmt!r}")
    logs = out / ".logs" / "read"
    wall = run_job([reader, _writer(out / "data")], tasks, logs, exe)
    steps = job_counts(logs)
    docs_in = _count(steps, 0, "documents") + sum(v for k, v in steps[0]["counts"].items() if k.startswith("skipped_"))
    return _report("read", inp, out, wall, [steps], docs_in, _count(steps, -1, "total"), format=fmt,
                   input_files=_count(steps, 0, "input_files"))  # fmt: skip


def stage_clean(inp: Path, out: Path, opts: Mapping[str, Any], exe: ExecutorConfig) -> dict[str, Any]:
    """NFC + Gopher / C4 / FineWeb rules on prose, code rules on code (options: ``gopher``, ``c4``,
    ``fineweb``, ``code`` — dicts of the filters' keyword arguments, or false to turn one off)."""
    from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter

    from qwenkit.data.pipeline.steps import CodeQualityFilter, Normalize, ProseOnly
    from qwenkit.data.pipeline.text import RegexWordTokenizer

    tok = RegexWordTokenizer()
    # C4's terminal-punctuation and curly-bracket rules target web pages: they would strip most
    # lines of a README or drop every doc with a code example, so they are off by default.
    defaults = {"gopher": {}, "c4": {"filter_no_terminal_punct": False, "filter_curly_bracket": False,
                                     "min_num_sentences": -1}, "fineweb": False, "code": {}}  # fmt: skip
    middle: list[Any] = [Normalize()]
    for key, cls in (("gopher", GopherQualityFilter), ("c4", C4QualityFilter), ("fineweb", FineWebQualityFilter)):
        kw = opts.get(key, defaults[key])
        if kw is not False:
            kw = {**(defaults[key] or {}), **(kw if isinstance(kw, dict) else {})}
            middle.append(ProseOnly(cls(language=tok, **kw), key))
    code = opts.get("code", {})
    if code is not False:
        middle.append(CodeQualityFilter(**(code if isinstance(code, dict) else {})))
    return _simple("clean", inp, out, middle, exe)


def _doc_bytes(doc: Any) -> bytes:
    return doc.text.encode("utf-8")


# datatrove picks its hash function from the getter's return annotation (a class, not a string)
_doc_bytes.__annotations__["return"] = bytes


def _hash_config() -> Any:
    from datatrove.utils.hashing import HashConfig

    # datatrove's default xxhash passes str, which xxhash>=4 refuses; its sha1 path encodes first
    return HashConfig(hash_fc="sha1", precision=64)


def minhash_params(threshold: float | None, num_hashes: int = 112) -> tuple[int, int]:
    """(buckets, hashes per bucket) with ``b * r <= num_hashes`` whose LSH threshold
    ``(1/b)^(1/r)`` is closest to ``threshold``."""
    if threshold is None:
        return 14, 8
    if not 0 < threshold < 1:
        raise DataError(f"dedup threshold must be in (0, 1), got {threshold}")
    pairs = [(b, r) for b in range(1, num_hashes + 1) for r in range(1, num_hashes // b + 1)]
    # closest threshold first, then the most hashes (a steeper S-curve)
    return min(pairs, key=lambda br: (round(abs((1 / br[0]) ** (1 / br[1]) - threshold), 3), -br[0] * br[1]))


def stage_dedup(inp: Path, out: Path, opts: Mapping[str, Any], exe: ExecutorConfig) -> dict[str, Any]:
    """Exact dedup (content hash) then MinHash-LSH near dedup with datatrove. Options: ``exact``,
    ``near`` (bools), ``threshold`` (Jaccard, picks buckets x hashes) or ``num_buckets`` +
    ``hashes_per_bucket``, ``ngram_size`` (words, default 5). Removed documents go to
    ``OUT/removed/{exact,near}``; near-duplicate examples (removed + kept copy) are in the report."""
    from datatrove.pipeline.dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups,
                                          MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                          MinhashDedupFilter, MinhashDedupSignature)  # fmt: skip
    from datatrove.pipeline.writers import JsonlWriter

    from qwenkit.data.pipeline.text import RegexWordTokenizer

    work = out / ".work"
    logs = out / ".logs"
    jobs: list[list[dict[str, Any]]] = []
    wall = 0.0
    cur = inp
    docs_in = None
    if opts.get("exact", True):
        cfg = ExactDedupConfig(content_getter=_doc_bytes, hash_config=_hash_config())
        reader, tasks = _reader(cur)
        wall += run_job([reader, ExactDedupSignature(str(work / "exact_sigs"), cfg)], tasks, logs / "exact_sig", exe)
        wall += run_job([ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), cfg)], 1,
                        logs / "exact_find", exe)  # fmt: skip
        reader, tasks = _reader(cur)
        excl = JsonlWriter(str(out / "removed" / "exact"), output_filename="${rank}.jsonl.gz")
        target = out if not opts.get("near", True) else work / "exact_out"
        wall += run_job([reader, ExactDedupFilter(str(work / "exact_dups"), cfg, exclusion_writer=excl),
                         _writer(target / "data")], tasks, logs / "exact_filter", exe)  # fmt: skip
        steps = job_counts(logs / "exact_filter")
        docs_in = _count(steps, 0, "documents")
        exact_removed = _count(steps, 1, "dropped")
        jobs.append([{**s, "name": f"exact: {s['name']}"} for s in steps])
        if opts.get("near", True):
            (target / REPORT).write_text("{}")  # marks exact_out as a stage folder for _reader
        cur = target
    else:
        exact_removed = 0
    near_removed, examples = 0, []
    if opts.get("near", True):
        b, r = minhash_params(opts.get("threshold"))
        b, r = int(opts.get("num_buckets", b)), int(opts.get("hashes_per_bucket", r))
        mh = MinhashConfig(n_grams=int(opts.get("ngram_size", 5)), num_buckets=b, hashes_per_bucket=r,
                           hash_config=_hash_config())
        tok = RegexWordTokenizer()
        reader, tasks = _reader(cur)
        wall += run_job([reader, MinhashDedupSignature(str(work / "mh_sigs"), mh, language=tok)], tasks,
                        logs / "near_sig", exe)  # fmt: skip
        wall += run_job([MinhashDedupBuckets(str(work / "mh_sigs"), str(work / "mh_buckets"), config=mh)], b,
                        logs / "near_buckets", exe)  # fmt: skip
        wall += run_job([MinhashDedupCluster(str(work / "mh_buckets"), str(work / "mh_clusters"), config=mh,
                                             save_cluster_id=True)], 1, logs / "near_cluster", exe)  # fmt: skip
        reader, tasks = _reader(cur)
        excl = JsonlWriter(str(out / "removed" / "near"), output_filename="${rank}.jsonl.gz")
        wall += run_job([reader, MinhashDedupFilter(str(work / "mh_clusters"), exclusion_writer=excl,
                                                    load_cluster_ids=True), _writer(out / "data")],
                        tasks, logs / "near_filter", exe)  # fmt: skip
        steps = job_counts(logs / "near_filter")
        if docs_in is None:
            docs_in = _count(steps, 0, "documents")
        near_removed = _count(steps, 1, "dropped")
        jobs.append([{**s, "name": f"near: {s['name']}"} for s in steps])
        examples = near_dup_examples(out, int(opts.get("examples", 3)))
    final = job_counts(logs / ("near_filter" if opts.get("near", True) else "exact_filter"))
    rep = _report("dedup", inp, out, wall, jobs, docs_in or 0, _count(final, -1, "total"),
                   exact_duplicates=exact_removed, near_duplicates=near_removed, near_duplicate_examples=examples,
                   minhash={"ngram_size": mh.n_grams, "buckets": b, "hashes_per_bucket": r,
                            "threshold": round((1 / b) ** (1 / r), 3)} if opts.get("near", True) else None)  # fmt: skip
    rep["dropped"].update({"exact_duplicate": exact_removed, "near_duplicate": near_removed})
    (out / REPORT).write_text(json.dumps(rep, indent=1, default=str) + "\n")
    return rep


def _read_jsonl_gz(folder: Path) -> list[dict[str, Any]]:
    import gzip

    out = []
    for f in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            out += [json.loads(line) for line in fh if line.strip()]
    return out


def near_dup_examples(out: Path, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` (removed document, kept document of its cluster) pairs, by id and path."""
    removed = _read_jsonl_gz(out / "removed" / "near")
    if not removed or n <= 0:
        return []
    want = {}
    for d in removed:
        cid = d.get("metadata", {}).get("minhash_cluster_id", -1)
        if cid != -1 and cid not in want:
            want[cid] = d
        if len(want) >= n:
            break
    kept = {}
    for d in _read_jsonl_gz(out / "data"):
        cid = d.get("metadata", {}).get("minhash_cluster_id", -1)
        if cid in want and cid not in kept:
            kept[cid] = d
    return [{"cluster": cid, "removed": d.get("id"), "kept": kept.get(cid, {}).get("id"),
             "removed_chars": len(d.get("text", "")), "kept_chars": len(kept.get(cid, {}).get("text", ""))}
            for cid, d in want.items()]  # fmt: skip


def stage_decontaminate(inp: Path, out: Path, opts: Mapping[str, Any], exe: ExecutorConfig) -> dict[str, Any]:
    """Drop documents sharing an ``ngram`` (default 13) word n-gram or an exact prompt with
    ``benchmarks`` (default humaneval + mbpp; JSONL paths too). The report names each benchmark
    item that collided and each document dropped."""
    from qwenkit.curate.benchmarks import benchmark_items
    from qwenkit.data.pipeline.steps import NGramDecontaminator

    names = list(opts.get("benchmarks", ["humaneval", "mbpp"])) + list(opts.get("extra", []))
    items = benchmark_items(names)
    coll = out / "collisions"
    step = NGramDecontaminator(items, coll, n=int(opts.get("ngram", 13)))
    rep = _simple("decontaminate", inp, out, [step], exe, benchmarks=names, benchmark_items=len(items))
    collisions = []
    for f in sorted(coll.glob("collisions-*.jsonl")):
        collisions += [json.loads(x) for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]
    by_item: dict[str, list[str]] = {}
    for c in collisions:
        for it in c["items"]:
            by_item.setdefault(it, []).append(c["doc"])
    rep.update(items_collided=dict(sorted(by_item.items())), docs_dropped=[c["doc"] for c in collisions],
               collisions=collisions)  # fmt: skip
    (out / REPORT).write_text(json.dumps(rep, indent=1, default=str) + "\n")
    return rep


def stage_classify(inp: Path, out: Path, opts: Mapping[str, Any], exe: ExecutorConfig) -> dict[str, Any]:
    """Label ``metadata.domain`` (code / math / zh / en / other); counts per domain in the report."""
    from qwenkit.data.pipeline.steps import DomainClassifier

    rep = _simple("classify", inp, out, [DomainClassifier()], exe)
    counts = rep["steps"][1]["counts"]
    rep["domains"] = {k[len("domain_"):]: v for k, v in counts.items() if k.startswith("domain_")}
    (out / REPORT).write_text(json.dumps(rep, indent=1, default=str) + "\n")
    return rep


SEED_MIX = {"code": 0.18, "math": 0.12, "zh": 0.40, "en": 0.30}


def stage_mix(inp: Path, out: Path, opts: Mapping[str, Any], exe: ExecutorConfig) -> dict[str, Any]:
    """Sample to ``targets`` (domain -> ratio, default the seeds' code 18 / math 12 / zh 40 / en 30 %)
    measured in ``unit`` (chars or docs); ``upsample`` repeats scarce domains instead of cutting
    the rest. Reports target, input and achieved ratios."""
    from qwenkit.data.pipeline.steps import DOMAINS, DomainSizeCounter, MixSampler, mix_weights

    targets = dict(opts.get("targets") or SEED_MIX)
    unknown = set(targets) - set(DOMAINS)
    if unknown:
        raise DataError(f"mix.targets: unknown domain(s) {sorted(unknown)}; known: {list(DOMAINS)}")
    unit = opts.get("unit", "chars")
    if unit not in ("chars", "docs"):
        raise DataError(f"mix.unit must be chars or docs, got {unit!r}")
    reader, tasks = _reader(inp)
    sizes_dir = out / ".work" / "sizes"
    wall = run_job([reader, DomainSizeCounter(sizes_dir, unit)], tasks, out / ".logs" / "mix_count", exe)
    sizes: Counter[str] = Counter()
    for f in sorted(sizes_dir.glob("sizes-*.json")):
        sizes.update(json.loads(f.read_text()))
    try:
        weights = mix_weights(sizes, targets, bool(opts.get("upsample", False)))
    except ValueError as e:
        raise DataError(f"mix: {e}") from None
    sampler = MixSampler(weights, unit, int(opts.get("seed", 0)))
    reader, tasks = _reader(inp)
    logs = out / ".logs" / "mix"
    wall += run_job([reader, sampler, _writer(out / "data")], tasks, logs, exe)
    steps = job_counts(logs)
    outs = {k[len("out_"):]: v for k, v in steps[1]["counts"].items() if k.startswith("out_")}
    tot_in, tot_out = sum(sizes.values()) or 1, sum(outs.values()) or 1
    # targets of domains without data cannot be met: the others are scaled up to sum to 1
    met = {d: float(t) for d, t in targets.items() if t > 0 and sizes.get(d, 0) > 0}
    met = {d: t / sum(met.values()) for d, t in met.items()}
    return _report("mix", inp, out, wall, [steps], _count(steps, 0, "documents"), _count(steps, -1, "total"),
                   unit=unit, weights={k: round(v, 4) for k, v in weights.items()},
                   ratios={d: {"target": targets.get(d, 0.0), "target_renormalized": round(met.get(d, 0.0), 4),
                               "input": round(sizes.get(d, 0) / tot_in, 4),
                               "achieved": round(outs.get(d, 0) / tot_out, 4)} for d in sorted(set(sizes) | set(targets))})  # fmt: skip


def _tokenizer_loader(spec: str) -> Callable[[], Any]:
    from functools import partial

    from qwenkit.loaders.load import load_tokenizer

    return partial(load_tokenizer, spec)


def stage_tokenize(inp: Path, out: Path, opts: Mapping[str, Any], exe: ExecutorConfig) -> dict[str, Any]:
    """Tokenize with ``tokenizer`` (registry name, .gguf, HF folder), EOS after each document, into
    :mod:`qwenkit.data.shards` shards in OUT plus ``dataset.json`` (shards, token counts, sha256 in
    each shard manifest, ``sources``) — what ``qwenkit train pretrain --data OUT`` reads."""
    from qwenkit.data.pipeline.steps import ShardTokenizer
    from qwenkit.data.shards import DATASET_MANIFEST, write_dataset_manifest
    from qwenkit.loaders.catalog import DEFAULT_MODEL

    spec = str(opts.get("tokenizer") or DEFAULT_MODEL)
    step = ShardTokenizer(out, _tokenizer_loader(spec), tokenizer_name=str(opts.get("tokenizer_name") or spec),
                          max_tokens_per_shard=int(opts.get("max_tokens_per_shard", 1 << 28)))  # fmt: skip
    reader, tasks = _reader(inp)
    logs = out / ".logs" / "tokenize"
    wall = run_job([reader, step], tasks, logs, exe)
    steps = job_counts(logs)
    names = sorted(p.stem for p in out.glob("*.idx"))
    if not names:
        raise DataError(f"tokenize: no documents in {inp}; no shards written")
    write_dataset_manifest(out, names)
    sources: Counter[str] = Counter()
    src_tokens: Counter[str] = Counter()
    for f in sorted((out / ".sources").glob("*.json")):
        for k, v in json.loads(f.read_text()).items():
            sources[k] += v["documents"]
            src_tokens[k] += v["tokens"]
    manifest = json.loads((out / DATASET_MANIFEST).read_text())
    manifest["sources"] = {k: {"documents": sources[k], "tokens": src_tokens[k]} for k in sorted(sources)}
    manifest["eos_between_documents"] = "<|endoftext|>"
    (out / DATASET_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return _report("tokenize", inp, out, wall, [steps], _count(steps, 0, "documents"), manifest["num_docs"],
                   tokens=manifest["num_tokens"], shards=len(names), tokenizer=spec)  # fmt: skip


def stage_judge(inp: Path, out: Path, opts: Mapping[str, Any], exe: ExecutorConfig) -> dict[str, Any]:
    from qwenkit.curate.judge import run_judge_stage

    return run_judge_stage(inp, out, opts, exe)


def stage_exec_filter(inp: Path, out: Path, opts: Mapping[str, Any], exe: ExecutorConfig) -> dict[str, Any]:
    from qwenkit.curate.exec_filter import ExecFilter

    return _simple("exec-filter", inp, out, [ExecFilter(timeout_s=float(opts.get("timeout", 10.0)),
                                                        tests_key=opts.get("tests_key", "tests"))], exe)  # fmt: skip


STAGES: dict[str, Callable[[Path, Path, Mapping[str, Any], ExecutorConfig], dict[str, Any]]] = {
    "read": stage_read, "clean": stage_clean, "dedup": stage_dedup, "decontaminate": stage_decontaminate,
    "classify": stage_classify, "mix": stage_mix, "judge": stage_judge, "exec-filter": stage_exec_filter,
    "tokenize": stage_tokenize,
}  # fmt: skip


def run_stage(name: str, inp: str | os.PathLike[str], out: str | os.PathLike[str], opts: Mapping[str, Any] | None = None,
              exe: ExecutorConfig | None = None) -> dict[str, Any]:  # fmt: skip
    """Run one stage ``name`` (:data:`STAGES`) from ``inp`` into ``out``; returns its report."""
    if name not in STAGES:
        raise DataError(f"unknown pipeline step {name!r}; known: {', '.join(STAGES)}")
    inp, out = Path(inp), Path(out)
    _check_out(inp, out)
    out.mkdir(parents=True, exist_ok=True)
    return STAGES[name](inp, out, dict(opts or {}), exe or ExecutorConfig())


def load_pipeline_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a pipeline YAML: ``input``, ``output``, ``steps`` (a list of step names or
    ``{name: {options}}``), optional ``executor``, ``workers``, ``address``. Relative paths are
    relative to the file."""
    import yaml

    p = Path(path)
    try:
        spec = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{p}: pipeline file not found") from None
    except yaml.YAMLError as e:
        raise DataError(f"{p}: invalid YAML ({e})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{p}: expected a mapping with input, output and steps")
    for key in ("input", "output", "steps"):
        if key not in spec:
            raise DataError(f"{p}: missing field {key!r}")
    if not isinstance(spec["steps"], list) or not spec["steps"]:
        raise DataError(f"{p}: 'steps' must be a non-empty list")
    steps = []
    for i, st in enumerate(spec["steps"]):
        if isinstance(st, str):
            name, opts = st, {}
        elif isinstance(st, dict) and len(st) == 1:
            name, opts = next(iter(st.items()))
            opts = opts or {}
        else:
            raise DataError(f"{p}: steps[{i}] must be a step name or {{name: {{options}}}}, got {st!r}")
        if name not in STAGES:
            raise DataError(f"{p}: steps[{i}]: unknown step {name!r}; known: {', '.join(STAGES)}")
        if not isinstance(opts, dict):
            raise DataError(f"{p}: steps[{i}] ({name}): options must be a mapping, got {opts!r}")
        steps.append((name, opts))
    base = p.parent
    unknown = set(spec) - {"input", "output", "steps", "executor", "workers", "address"}
    if unknown:
        raise DataError(f"{p}: unknown field(s) {sorted(unknown)}")
    return {**spec, "input": base / str(spec["input"]), "output": base / str(spec["output"]), "steps": steps}


def run_pipeline(spec: Mapping[str, Any], exe: ExecutorConfig) -> dict[str, Any]:
    """Run the steps of ``spec`` (:func:`load_pipeline_file`) in order, step ``k`` into
    ``output/<k>-<name>``; finished steps' tasks are skipped on a rerun. Writes ``output/report.json``."""
    out = Path(spec["output"])
    cur = Path(spec["input"])
    summary = []
    for k, (name, opts) in enumerate(spec["steps"], 1):
        dest = out / f"{k:02d}-{name}"
        rep = run_stage(name, cur, dest, opts, exe)
        summary.append({key: rep.get(key) for key in ("stage", "output", "docs_in", "docs_out", "dropped", "skipped",
                                                     "wall_s", "docs_per_s")})  # fmt: skip
        cur = dest
    report = {"input": str(spec["input"]), "output": str(out), "executor": exe.executor, "workers": exe.workers,
              "steps": summary, "final": str(cur)}  # fmt: skip
    (out / REPORT).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report
