"""Training throughput, side by side: qwenkit's trainer vs TRL's `SFTTrainer` (full and LoRA).

Both engines get the same HF model folder, the same rows of token ids in the same order, the
same sequence length, batch, precision, optimizer and number of steps; each engine × mode ×
precision runs in its own subprocess, so its peak RSS (``ru_maxrss`` of that child, from
``os.wait4``) is its own.

Workload (defaults, the issue's anchor): Coder-0.5B exported from its GGUF to an HF folder
(fp32, cached under ``<qwenkit cache>/bench/hf/<name>-<sha>``, so reruns skip the export); rows
of exactly ``--seq-len`` (512) tokens cut from this machine's Python standard library (the
``*.py`` files under ``sysconfig.get_paths()["stdlib"]``, sorted by path, each tokenized alone
and joined by ``<|endoftext|>``; deterministic for a given Python); ``--batch`` (4) rows a step,
no gradient accumulation, every token a target (511 next-token targets a row in both engines).

Same settings in both: AdamW (torch fused) betas (0.9, 0.999), eps 1e-8, weight decay 0.0, grad
clipping at 1.0, constant LR (1e-5 full, 1e-4 LoRA), no warmup, no gradient checkpointing, data
in order (qwenkit ``shuffle=False``; TRL ``train_sampling_strategy="sequential"``). LoRA: r=16,
alpha=32, dropout 0, on q,k,v,o,gate,up,down (peft ``LoraConfig`` in both).

Precision ``bf16``: autocast to bfloat16 with fp32 master weights and fp32 AdamW state in both
(qwenkit `precision=bf16`; TRL ``bf16=True``, which on the CPU makes accelerate wrap the forward
in ``torch.autocast("cpu", dtype=torch.bfloat16)``: the weights stay fp32). ``fp32``: no
autocast.

Engines:
- ``qwenkit``: the `qwenkit.train.trainer.Trainer` step (fused linear cross-entropy, document
  attention) on a `StepLoader` over the rows (packing rows of exactly ``seq_len``: one row each),
  driven step by step in the child (no checkpoint is written).
- ``trl``: ``trl.SFTTrainer`` on a ``datasets.Dataset`` of ``input_ids``/``labels``
  (pre-tokenized, ``dataset_kwargs={"skip_prepare_dataset": True}``), ``packing=False``,
  ``padding_free=False``, ``use_cpu=True``; the model from ``AutoModelForCausalLM`` in fp32
  (sdpa attention). TRL's own per-step metrics (entropy, token accuracy) stay on, as a user gets it.

Measured per run: ``--warmup-steps`` untimed steps, then ``--steps`` timed steps; tokens/s =
timed tokens / wall time from the end of the last warm-up step (the start of the first step
without warm-up) to the end of the last step (data loading and per-step logging included, model
load excluded); TRL's steps are clocked by a ``TrainerCallback`` (``on_step_begin`` /
``on_step_end``). The first step's loss (before any update: the same model on the same batch)
is reported for both, unrounded, as the check that the two engines compute the same thing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

ENGINES = ("qwenkit", "trl")
MODES = ("full", "lora")
PRECISIONS = ("bf16", "fp32")
LORA_R, LORA_ALPHA = 16, 32
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR = {"full": 1e-5, "lora": 1e-4}
ADAM = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "max_grad_norm": 1.0}
DOC_SEPARATOR = "<|endoftext|>"


def log(msg: str) -> None:
    print(f"[bench train] {msg}", file=sys.stderr, flush=True)


@dataclass
class TrainResult:
    engine: str
    mode: str
    precision: str
    model: str = ""
    threads: int = 0
    seq_len: int = 0
    batch: int = 0
    steps: int = 0
    warmup_steps: int = 0
    tokens_per_s: float = 0.0
    timed_s: float = 0.0
    timed_tokens: int = 0
    step_s: list[float] = field(default_factory=list)  # every step's own time (begin -> end)
    losses: list[float] = field(default_factory=list)  # every step's loss, the first unrounded
    first_loss: float = float("nan")
    peak_rss_gb: float = 0.0
    load_s: float = 0.0
    trainable_params: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    loadavg_before: float = 0.0
    loadavg_after: float = 0.0
    error: str | None = None


# ------------------------------------------------------------------------------- model, data
def hf_model_dir(spec: str) -> Path:
    """An HF folder for `spec`: the folder itself, or the GGUF exported (fp32) into the cache once,
    keyed by the registry sha256 (or, for a loose .gguf, its name, size and mtime)."""
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p
    from qwenkit.loaders.cache import cache_home
    from qwenkit.loaders.resolve import resolve_model

    src = resolve_model(spec)
    if src.format == "hf":
        return src.path
    if src.entry is not None:
        key = src.entry.sha256[:16]
    else:
        st = src.path.stat()
        key = hashlib.sha256(f"{src.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_home() / "bench" / "hf" / f"{src.name}-{key}"
    if (out / "config.json").is_file():
        log(f"model: {out} (cached export of {src.path.name})")
        return out
    log(f"exporting {src.path.name} to an HF folder (fp32, once): {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        # in a child, so the parent never holds the model's memory while the engines run
        subprocess.run([sys.executable, "-m", "qwenkit", "export", str(src.path), str(tmp)], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        if not (out / "config.json").is_file():
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def corpus_files(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The corpus's files in a fixed order: ``root`` itself if it is a file, else its ``*.py`` (or,
    without any, every file) sorted by relative path. Default: the Python standard library
    (without site-/dist-packages)."""
    if root is None:
        import sysconfig

        root = sysconfig.get_paths()["stdlib"]
    base = Path(root)
    if base.is_file():
        return [base]
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [f for f in base.rglob("*.py") if f.is_file() and not skip & set(f.relative_to(base).parts)]
    if not files:
        files = [f for f in base.rglob("*") if f.is_file() and not skip & set(f.relative_to(base).parts)]
    return sorted(files, key=lambda f: f.relative_to(base).as_posix())


def build_rows(model_dir: str | os.PathLike[str], n_rows: int, seq_len: int,
               corpus: str | os.PathLike[str] | None = None) -> list[list[int]]:  # fmt: skip
    """`n_rows` rows of exactly `seq_len` token ids: the corpus files, each tokenized alone with the
    model's tokenizer (no special tokens added), joined by the ``<|endoftext|>`` id (the
    tokenizer's EOS where it has no such token), cut into consecutive rows."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    sep = tok.token_to_id(DOC_SEPARATOR)
    if sep is None:
        cfg = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
        eos = cfg.get("eos_token")
        sep = tok.token_to_id(eos["content"] if isinstance(eos, dict) else eos)
    need = n_rows * seq_len
    ids: list[int] = []
    files = corpus_files(corpus)
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        ids.extend(tok.encode(text, add_special_tokens=False).ids)
        ids.append(sep)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"the corpus ({len(files)} files) has {len(ids)} tokens; {n_rows} rows of {seq_len} "
                         f"need {need}")  # fmt: skip
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(n_rows)]


# ------------------------------------------------------------------------------------ workers
class _Clock:
    """Wall-clock stamps of each step's begin and end."""

    def __init__(self) -> None:
        self.begin: list[float] = []
        self.end: list[float] = []

    def timed(self, warmup: int) -> tuple[float, list[float]]:
        """(wall seconds of the timed steps, each step's own seconds)."""
        start = self.end[warmup - 1] if warmup > 0 else self.begin[0]
        return self.end[-1] - start, [e - b for b, e in zip(self.begin, self.end)]


def _finish(res: TrainResult, clock: _Clock, losses: list[float], args: argparse.Namespace) -> TrainResult:
    total = args.warmup_steps + args.steps
    if len(clock.end) != total:
        raise RuntimeError(f"{res.engine} ran {len(clock.end)} steps, {total} expected")
    res.timed_s, res.step_s = clock.timed(args.warmup_steps)
    res.timed_tokens = args.steps * args.batch * args.seq_len
    res.tokens_per_s = res.timed_tokens / res.timed_s if res.timed_s > 0 else 0.0
    res.losses = losses
    res.first_loss = losses[0] if losses else float("nan")
    return res


def run_qwenkit(args: argparse.Namespace, rows: list[list[int]], res: TrainResult) -> TrainResult:
    import numpy as np
    import torch

    from qwenkit.train.config import build_config
    from qwenkit.train.dataloader import StepLoader
    from qwenkit.train.distributed import DistInfo
    from qwenkit.train.recipes import load_training_model
    from qwenkit.train.trainer import Trainer

    total = args.warmup_steps + args.steps
    lr = LR[args.mode]
    with tempfile.TemporaryDirectory(prefix="qwenkit-bench-train-") as out:
        cfg = build_config("sft", {
            "model": str(args.model_dir), "out": out, "max_length": args.seq_len, "packing": True,
            "batch_size": args.batch, "micro_batch_size": args.batch, "max_steps": total, "lr": lr, "min_lr": lr,
            "warmup_steps": 0, "weight_decay": ADAM["weight_decay"], "adam_beta1": ADAM["betas"][0],
            "adam_beta2": ADAM["betas"][1], "adam_eps": ADAM["eps"], "max_grad_norm": ADAM["max_grad_norm"],
            "precision": args.precision, "gradient_checkpointing": False, "lora": args.mode == "lora",
            "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "lora_targets": LORA_TARGETS,
            "num_threads": args.threads, "tensorboard": False, "progress": False, "memory_check": False,
        })  # fmt: skip
        t0 = time.perf_counter()
        torch.manual_seed(0)
        info = DistInfo(0, 1, 0, torch.device("cpu"))
        _, model, _ = load_training_model(cfg, info)  # as `qwenkit train` does (LoRA, bf16 base)
        # rows of exactly seq_len, packed into rows of seq_len: one row each, in data order
        docs = [np.asarray(r, dtype=np.int64) for r in rows]
        loader = StepLoader(docs, max_length=cfg.max_length, packing=True, batch_size=cfg.batch_size,
                            micro_batch_size=cfg.micro_batch_size, shuffle=False, max_steps=total)  # fmt: skip

        def no_save(*_: Any) -> None:
            raise RuntimeError("the bench writes no checkpoint")

        trainer = Trainer(cfg, model, loader, info, save_model=no_save, load_trainable=no_save)
        res.load_s = time.perf_counter() - t0
        res.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        res.config = {"torch_threads": torch.get_num_threads(), "loss_chunk": cfg.loss_chunk,
                      "activation_checkpointing": False,
                      "optimizer": type(trainer.optimizer).__name__,
                      "optimizer_fused": bool(trainer.optimizer.defaults.get("fused")), "lr": lr}  # fmt: skip
        clock, losses = _Clock(), []
        trainer.wrapped.train()
        for i, micro in enumerate(loader):  # what Trainer.fit does a step, without its logging / saving
            clock.begin.append(time.perf_counter())
            m = trainer._step(micro)
            clock.end.append(time.perf_counter())
            losses.append(float(m["loss"]))
            log(f"  qwenkit {args.mode} {args.precision} step {i + 1}/{total}: loss {m['loss']:.6f}, "
                f"{clock.end[-1] - clock.begin[-1]:.2f} s{' (warm-up)' if i < args.warmup_steps else ''}")
    return _finish(res, clock, losses, args)


def run_trl(args: argparse.Namespace, rows: list[list[int]], res: TrainResult) -> TrainResult:
    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    total = args.warmup_steps + args.steps
    lr = LR[args.mode]
    clock, losses = _Clock(), []
    precision_seen: dict[str, str] = {}

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            clock.begin.append(time.perf_counter())

        def on_step_end(self, _args: Any, state: Any, *a: Any, **k: Any) -> None:
            clock.end.append(time.perf_counter())
            n = len(clock.end)
            log(f"  trl {args.mode} {args.precision} step {n}/{total}: loss {losses[-1]:.6f}, "
                f"{clock.end[-1] - clock.begin[-1]:.2f} s{' (warm-up)' if n <= args.warmup_steps else ''}")

    class Bench(SFTTrainer):
        def compute_loss(self, model: Any, inputs: Any, *a: Any, **k: Any) -> Any:
            out = super().compute_loss(model, inputs, *a, **k)
            if model.training:
                loss = out[0] if isinstance(out, tuple) else out
                losses.append(float(loss.detach()))  # unrounded (the logged loss has 4 decimals)
            return out

    with tempfile.TemporaryDirectory(prefix="trl-bench-train-") as out:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = DOC_SEPARATOR
        # what autocast does to a projection: its weight dtype and its output dtype, seen once
        proj = model.model.layers[0].self_attn.q_proj

        def see(mod: Any, inp: Any, output: Any) -> None:
            if model.training and not precision_seen:
                precision_seen.update(weight=str(mod.weight.dtype), output=str(output.dtype),
                                      autocast=str(torch.is_autocast_enabled("cpu")))  # fmt: skip

        proj.register_forward_hook(see)
        data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
        # SFTConfig defaults to gradient checkpointing on; transformers 5 renamed it activation_checkpointing
        # (the old name is only read when the new one is unset)
        import dataclasses

        names = {f.name for f in dataclasses.fields(SFTConfig)}
        no_checkpointing = {"activation_checkpointing" if "activation_checkpointing" in names
                            else "gradient_checkpointing": False}  # fmt: skip
        sft = SFTConfig(
            output_dir=out, max_steps=total, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=ADAM["weight_decay"],
            adam_beta1=ADAM["betas"][0], adam_beta2=ADAM["betas"][1], adam_epsilon=ADAM["eps"],
            max_grad_norm=ADAM["max_grad_norm"], optim="adamw_torch_fused",
            bf16=args.precision == "bf16", fp16=False, use_cpu=True,
            packing=False, padding_free=False, max_length=args.seq_len,
            dataset_kwargs={"skip_prepare_dataset": True}, train_sampling_strategy="sequential",
            report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
            dataloader_num_workers=0, **no_checkpointing,
        )  # fmt: skip
        peft_config = None
        if args.mode == "lora":
            from peft import LoraConfig

            peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                     target_modules=list(LORA_TARGETS), bias="none", task_type="CAUSAL_LM")  # fmt: skip
        trainer = Bench(model=model, args=sft, train_dataset=data, processing_class=tokenizer,
                        peft_config=peft_config, callbacks=[StepClock()])  # fmt: skip
        res.load_s = time.perf_counter() - t0
        res.trainable_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
        opt = trainer.optimizer
        opt = getattr(opt, "optimizer", opt)  # accelerate's wrapper
        res.config = {"torch_threads": torch.get_num_threads(), "optimizer": type(opt).__name__,
                      "optimizer_fused": bool(opt.defaults.get("fused")), "lr": lr,
                      "attn_implementation": model.config._attn_implementation,
                      "mixed_precision": str(trainer.accelerator.mixed_precision),
                      "activation_checkpointing": bool(getattr(sft, "activation_checkpointing", None)
                                                       or getattr(sft, "gradient_checkpointing", False)),
                      "q_proj_under_training": precision_seen, "transformers": transformers.__version__}  # fmt: skip
    # one compute_loss per step (no accumulation): the first is step 1's, before any update
    return _finish(res, clock, losses[:total], args)


def run_worker(args: argparse.Namespace, rows: list[list[int]]) -> TrainResult:
    import torch

    torch.set_num_threads(args.threads)
    res = TrainResult(args.engine, args.mode, args.precision, str(args.model_dir), args.threads, args.seq_len,
                      args.batch, args.steps, args.warmup_steps, loadavg_before=os.getloadavg()[0])  # fmt: skip
    if args.engine == "qwenkit":
        run_qwenkit(args, rows, res)
    elif args.engine == "trl":
        run_trl(args, rows, res)
    else:
        raise ValueError(f"unknown engine {args.engine!r}; choose from {', '.join(ENGINES)}")
    res.loadavg_after = os.getloadavg()[0]
    # the parent replaces this with the child's ru_maxrss from os.wait4 (the same figure, at exit)
    from qwenkit.cpu.allocator import peak_resident_bytes

    res.peak_rss_gb = peak_resident_bytes() / 1024**3
    return res


# ------------------------------------------------------------------------------------- parent
def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def environment_lines(env: dict[str, Any]) -> list[str]:
    """The report footer every benchmark prints: CPU, its flags, threads, library versions."""
    return [f"CPU: {env.get('cpu')} | flags: {' '.join(env.get('cpu_flags', [])) or '–'} | "
            f"threads {env.get('threads')} of {env.get('cores')} cores",
            "versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)]  # fmt: skip


def environment(threads: int) -> dict[str, Any]:
    """CPU model and its vector / matrix flags, library versions, threads."""
    from importlib.metadata import PackageNotFoundError, version

    from qwenkit.cpu.build import cpu_flags

    name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    flags = sorted(f for f in cpu_flags()
                   if f in ("avx2", "fma", "f16c") or f.startswith(("avx512", "amx", "avx_vnni")))  # fmt: skip
    versions = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": name, "cpu_flags": flags, "cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "versions": versions}  # fmt: skip


def _worker_argv(args: argparse.Namespace, engine: str, mode: str, precision: str, rows_file: str) -> list[str]:
    return [sys.executable, "-m", "qwenkit.bench.train", "--worker", engine, "--rows-file", rows_file,
            "--model-dir", str(args.model_dir), "--modes", mode, "--precision", precision,
            "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--seq-len", str(args.seq_len),
            "--batch", str(args.batch), "--threads", str(args.threads)]  # fmt: skip


def _spawn(args: argparse.Namespace, engine: str, mode: str, precision: str, rows_file: str) -> TrainResult:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    # stderr passes through (the child's progress lines); the result is the last JSON line on stdout
    proc = subprocess.Popen(_worker_argv(args, engine, mode, precision, rows_file), stdout=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    res = None
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            res = TrainResult(**json.loads(line))
            break
    if res is None:
        res = TrainResult(engine, mode, precision, error=f"worker exited with {proc.returncode} and no result")
    res.config["peak_rss_gb_self_report"] = res.peak_rss_gb
    res.peak_rss_gb = usage.ru_maxrss / 1024**2  # KiB on Linux: this child's own peak
    return res


def run_bench(args: argparse.Namespace) -> tuple[list[TrainResult], dict[str, Any]]:
    args.model_dir = hf_model_dir(args.model)
    n_rows = (args.steps + args.warmup_steps) * args.batch
    t0 = time.perf_counter()
    rows = build_rows(args.model_dir, n_rows, args.seq_len, args.corpus)
    log(f"data: {n_rows} rows × {args.seq_len} tokens from {args.corpus or 'the Python standard library'} "
        f"({time.perf_counter() - t0:.1f} s)")
    env = environment(args.threads)
    log(f"CPU: {env['cpu']} [{' '.join(env['cpu_flags'])}], {args.threads} threads")
    results: list[TrainResult] = []
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(rows, f)
        rows_file = f.name
    try:
        runs = [(m, p, e) for m in args.modes for p in args.precision for e in args.engines]
        for k, (mode, precision, engine) in enumerate(runs, 1):
            log(f"[{k}/{len(runs)}] {engine} {mode} {precision}: {args.warmup_steps} warm-up + {args.steps} timed "
                f"steps of {args.batch}×{args.seq_len} tokens …")  # fmt: skip
            t = time.perf_counter()
            r = _spawn(args, engine, mode, precision, rows_file)
            log(f"[{k}/{len(runs)}] {engine} {mode} {precision}: " + (f"error: {r.error}" if r.error else
                f"{r.tokens_per_s:.1f} tok/s, peak RSS {r.peak_rss_gb:.2f} GB, first loss {r.first_loss:.6f}")
                + f" ({time.perf_counter() - t:.0f} s)")  # fmt: skip
            results.append(r)
    finally:
        os.unlink(rows_file)
    env["workload"] = {"model": args.model, "model_dir": str(args.model_dir), "seq_len": args.seq_len,
                       "batch": args.batch, "steps": args.steps, "warmup_steps": args.warmup_steps,
                       "corpus": args.corpus or "stdlib", "lr": LR, "adamw": ADAM,
                       "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0,
                                "targets": list(LORA_TARGETS)}}  # fmt: skip
    return results, env


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def format_report(results: Sequence[TrainResult], env: dict[str, Any]) -> str:
    lines = ["| engine | mode | precision | tokens/s | peak RSS GB | first-step loss |", "|---|---|---|---|---|---|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.engine} | {r.mode} | {r.precision} | error: {r.error} | | |")
        else:
            lines.append(f"| {r.engine} | {r.mode} | {r.precision} | {r.tokens_per_s:.1f} | {r.peak_rss_gb:.2f} "
                         f"| {r.first_loss:.6f} |")  # fmt: skip
    by = {(r.engine, r.mode, r.precision): r for r in results if not r.error}
    ratio_lines = []
    for mode in dict.fromkeys(r.mode for r in results):
        for prec in dict.fromkeys(r.precision for r in results):
            a, b = by.get(("qwenkit", mode, prec)), by.get(("trl", mode, prec))
            if a is None or b is None:
                continue
            speed = f"{a.tokens_per_s / b.tokens_per_s:.2f}×" if b.tokens_per_s else "–"
            rss = f"{a.peak_rss_gb / b.peak_rss_gb:.2f}×" if b.peak_rss_gb else "–"
            rel = _rel(a.first_loss, b.first_loss)
            ratio_lines.append(f"| qwenkit / trl | {mode} | {prec} | {speed} | {rss} | "
                               f"{a.first_loss:.6f} vs {b.first_loss:.6f} (rel {rel:.1e}) |")  # fmt: skip
    lines += ratio_lines
    lines += ["", *environment_lines(env)]
    w = env.get("workload")
    if w:
        lines.append(f"workload: {w['model']}, {w['batch']}×{w['seq_len']} tokens a step, "
                     f"{w['warmup_steps']} warm-up + {w['steps']} timed steps, corpus {w['corpus']}")  # fmt: skip
    return "\n".join(lines)


def write_json(path: str | os.PathLike[str], results: Sequence[TrainResult], env: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"environment": env, "results": [asdict(r) for r in results]}, indent=1))


def _csv(choices: Sequence[str]) -> Any:
    def parse(s: str) -> list[str]:
        items = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{s!r}: choose from {', '.join(choices)}")
        return items

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qwenkit.loaders.catalog import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name, .gguf path (exported once) or HF folder")
    p.add_argument("--engines", default=list(ENGINES), type=_csv(ENGINES))
    p.add_argument("--modes", default=list(MODES), type=_csv(MODES))
    p.add_argument("--precision", default=list(PRECISIONS), type=_csv(PRECISIONS))
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="rows a step (no gradient accumulation)")
    p.add_argument("--threads", type=int, default=default_threads(), help="torch threads (default: all cores)")
    p.add_argument("--corpus", default=None, help="a file or folder of text (default: the Python standard library)")
    p.add_argument("--json", default=None, help="write the environment and every result here")


def cmd_train(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.warmup_steps < 0 or args.seq_len < 2 or args.batch < 1:
        raise SystemExit("need --steps >= 1, --warmup-steps >= 0, --seq-len >= 2, --batch >= 1")
    results, env = run_bench(args)
    print(format_report(results, env))
    if args.json:
        write_json(args.json, results, env)
        log(f"wrote {args.json}")
    return 1 if any(r.error for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.worker:
        return cmd_train(args)
    args.engine, args.mode, args.precision = args.worker, args.modes[0], args.precision[0]
    rows = json.loads(Path(args.rows_file).read_text())
    try:
        res = run_worker(args, rows)
    except Exception as e:  # reported in the table, not a crash of the whole run
        import traceback

        traceback.print_exc()
        res = TrainResult(args.engine, args.mode, args.precision, error=f"{type(e).__name__}: {e}")
    print(json.dumps(asdict(res)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
