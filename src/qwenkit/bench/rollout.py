"""Rollout speed: qwenkit's engine vs what TRL's `GRPOTrainer` runs without vLLM (transformers'
`model.generate`), same prompts, same weights, same run.

Workload: the first `--prompts` MBPP+ tasks as chat prompts (the `qwenkit data pairs` user turn,
rendered with the model's chat template; the same token ids go to both engines), each sampled
`--num-generations` (G) times, at most `--max-completion-length` new tokens, temperature
`--temperature`, no top-p / top-k / min-p / repetition penalty (TRL's GRPOConfig defaults:
G 8, temperature 1.0, top_p 1.0, top_k 0, repetition_penalty 1.0), stopping at the model's EOS ids.

Engines (one after another in this process, each after an untimed warm-up generation):
- ``qwenkit``: `LLM` over the plain fp32 nn.Module as the trainer holds it (`load(...,
  quantization="none")`, `cpu.uninstall`: what GRPO's rollouts run on), every prompt one request
  with ``n=G``; ``qwenkit-bf16``: the same module in bf16 (a bf16 LoRA run's frozen base);
  ``qwenkit-autocast``: the fp32 module under bf16 autocast (a bf16 full fine-tune's rollouts);
  ``qwenkit-int8``: the default int8 inference runtime (what `rollout_quantization=int8` runs).
- ``trl``: GRPOTrainer's non-vLLM path mirrored: ``AutoModelForCausalLM`` fp32 from the same HF
  folder, the prompts repeated G times in a row (its RepeatSampler), left-padded with the pad
  token (EOS when the tokenizer has none), one ``model.generate`` call under ``no_grad`` with the
  `GenerationConfig` GRPOTrainer builds (max_new_tokens, do_sample, pad/bos/eos ids with the
  tokenizer's EOS first, temperature, top_p, top_k, min_p, repetition_penalty,
  cache_implementation None, disable_compile), completion tokens counted up to and including
  the first EOS (its completion mask). ``trl-bf16``: the same under bf16 autocast, as TRL's
  default ``bf16=True`` runs it (accelerate's autocast wrapper stays on the unwrapped model).

Reported: completion tokens (EOS included, as both count it), generation wall time (the call
only: model load and warm-up excluded), completion tokens/s and each qwenkit row's ratio to trl.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

ENGINES = ("qwenkit", "qwenkit-bf16", "qwenkit-autocast", "qwenkit-int8", "trl", "trl-bf16")


def log(msg: str) -> None:
    print(f"[bench rollout] {msg}", file=sys.stderr, flush=True)


@dataclass
class RolloutResult:
    engine: str
    prompts: int = 0
    num_generations: int = 0
    max_completion_length: int = 0
    completions: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    mean_completion_length: float = 0.0
    ended_with_eos: int = 0  # completions that stopped on EOS (the rest hit the length limit)
    load_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def build_prompts(model_dir: str | os.PathLike[str], n_prompts: int, data: str | None = None) -> list[list[int]]:
    """The first `n_prompts` tasks' chat prompts as token ids (qwenkit's tokenizer of the folder)."""
    from qwenkit.tokenizer import Tokenizer
    from qwenkit.train.pairs import load_tasks

    tok = Tokenizer.from_hf_dir(Path(model_dir))
    tasks = load_tasks(data)[:n_prompts]
    if len(tasks) < n_prompts:
        raise ValueError(f"--prompts {n_prompts}: only {len(tasks)} tasks")
    return [list(tok.apply_chat_template(t.messages(), add_generation_prompt=True, tokenize=True)) for t in tasks]


def _finish(res: RolloutResult, lengths: list[int], eos: int, seconds: float) -> RolloutResult:
    res.completions = len(lengths)
    res.completion_tokens = sum(lengths)
    res.seconds = seconds
    res.tokens_per_s = res.completion_tokens / seconds if seconds > 0 else 0.0
    res.mean_completion_length = res.completion_tokens / max(1, len(lengths))
    res.ended_with_eos = eos
    return res


def run_qwenkit(args: argparse.Namespace, prompts: list[list[int]], res: RolloutResult) -> RolloutResult:
    import torch

    from qwenkit import cpu
    from qwenkit.engine.llm import LLM
    from qwenkit.loaders.load import load
    from qwenkit.sampling_params import SamplingParams

    variant = res.engine.partition("-")[2] or "fp32"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "autocast")
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    lm = load(str(args.model_dir), dtype=dtype, quantization="int8" if variant == "int8" else "none", progress=False)
    model = lm.model if variant == "int8" else cpu.uninstall(lm.model)  # the trainer's plain module
    g, length = args.num_generations, args.max_completion_length
    llm = LLM(model, lm.tokenizer, generation_defaults=lm.generation_defaults, max_num_seqs=len(prompts) * g,
              max_model_len=max(map(len, prompts)) + length)  # fmt: skip
    res.load_s = time.perf_counter() - t0
    eos = set(model.config.eos_token_ids)
    sp = SamplingParams(n=g, temperature=args.temperature, top_p=1.0, top_k=-1, min_p=0.0, repetition_penalty=1.0,
                        max_tokens=length)  # fmt: skip
    torch.manual_seed(args.seed)  # unseeded requests draw from torch's global generator, as transformers does
    with autocast:
        llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=4), use_tqdm=False)
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        seconds = time.perf_counter() - t
    comps = [o for out in outs for o in out.outputs]
    res.config = {"dtype": str(dtype).removeprefix("torch."), "quantization": variant if variant == "int8" else "none",
                  "autocast": "bfloat16" if variant == "autocast" else None,
                  "requests": len(prompts), "n": g, "max_num_seqs": len(prompts) * g,
                  "torch_threads": torch.get_num_threads()}  # fmt: skip
    n_eos = sum(bool(o.token_ids) and o.token_ids[-1] in eos for o in comps)
    return _finish(res, [len(o.token_ids) for o in comps], n_eos, seconds)


def trl_generation_config(model: Any, tokenizer: Any, args: argparse.Namespace) -> tuple[Any, list[int]]:
    """The GenerationConfig and EOS ids GRPOTrainer (TRL 1.16) builds for transformers' generate."""
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id not in eos:
        eos = [tokenizer.eos_token_id, *eos]
    cfg = GenerationConfig(max_new_tokens=args.max_completion_length, do_sample=True,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=eos, temperature=args.temperature, top_p=1.0, top_k=0, min_p=None,
                           repetition_penalty=1.0, cache_implementation=None, disable_compile=True)  # fmt: skip
    return cfg, eos


def run_trl(args: argparse.Namespace, prompts: list[list[int]], res: RolloutResult) -> RolloutResult:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    gen_cfg, eos = trl_generation_config(model, tokenizer, args)
    res.load_s = time.perf_counter() - t0
    g = args.num_generations
    rows = [p for p in prompts for _ in range(g)]  # RepeatSampler: each prompt G times in a row
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])  # left padding
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    model.train()  # GRPOTrainer generates inside its training step
    torch.manual_seed(args.seed)
    bf16 = res.engine == "trl-bf16"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        warm = copy.deepcopy(gen_cfg)
        warm.max_new_tokens = 4
        model.generate(input_ids=ids[:1], attention_mask=mask[:1], generation_config=warm)
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        seconds = time.perf_counter() - t
    completion = out[:, width:]
    is_eos = torch.isin(completion, torch.tensor(eos))
    has = is_eos.any(dim=1)
    first = torch.where(has, is_eos.int().argmax(dim=1), torch.full_like(has, completion.size(1), dtype=torch.long))
    lengths = torch.minimum(first + 1, torch.tensor(completion.size(1)))  # up to and including the first EOS
    res.config = {"dtype": "float32", "autocast": "bfloat16" if bf16 else None, "rows": len(rows), "padded_prompt_width": width,
                  "generated_width": int(completion.size(1)), "attn_implementation": model.config._attn_implementation,
                  "generation_config": {k: v for k, v in gen_cfg.to_diff_dict().items() if k != "transformers_version"},
                  "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__}  # fmt: skip
    return _finish(res, [int(n) for n in lengths], int(has.sum()), seconds)


def run_bench(args: argparse.Namespace) -> tuple[list[RolloutResult], dict[str, Any]]:
    import torch

    from qwenkit.bench.train import environment, hf_model_dir

    torch.set_num_threads(args.threads)
    args.model_dir = hf_model_dir(args.model)
    prompts = build_prompts(args.model_dir, args.prompts, args.data)
    env = environment(args.threads)
    log(f"CPU: {env['cpu']} [{' '.join(env['cpu_flags'])}], {args.threads} threads")
    log(f"{len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens) x G={args.num_generations}, "
        f"<= {args.max_completion_length} new tokens, temperature {args.temperature}")  # fmt: skip
    results = []
    for engine in args.engines:
        res = RolloutResult(engine, len(prompts), args.num_generations, args.max_completion_length)
        t = time.perf_counter()
        try:
            (run_trl if engine.startswith("trl") else run_qwenkit)(args, prompts, res)
        except Exception as e:  # reported in the table, not a crash of the whole run
            import traceback

            traceback.print_exc()
            res.error = f"{type(e).__name__}: {e}"
        log(f"{engine}: " + (f"error: {res.error}" if res.error else
            f"{res.completion_tokens} tokens in {res.seconds:.1f} s = {res.tokens_per_s:.1f} tok/s")
            + f" ({time.perf_counter() - t:.0f} s)")  # fmt: skip
        results.append(res)
        gc.collect()
    env["workload"] = {"model": args.model, "model_dir": str(args.model_dir), "prompts": len(prompts),
                       "prompt_tokens": [len(p) for p in prompts], "num_generations": args.num_generations,
                       "max_completion_length": args.max_completion_length, "temperature": args.temperature,
                       "seed": args.seed, "data": args.data or "mbpp+"}  # fmt: skip
    return results, env


def ratios(results: Sequence[RolloutResult]) -> dict[str, float]:
    """Each qwenkit row's completion tokens/s over each trl row's."""
    ok = [r for r in results if not r.error and r.tokens_per_s]
    return {f"{q.engine} / {t.engine}": q.tokens_per_s / t.tokens_per_s
            for t in ok if t.engine.startswith("trl") for q in ok if not q.engine.startswith("trl")}  # fmt: skip


def format_report(results: Sequence[RolloutResult], env: dict[str, Any]) -> str:
    lines = ["| engine | completions | completion tokens | ended on EOS | seconds | tokens/s |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        if r.error:
            lines.append(f"| {r.engine} | error: {r.error} | | | | |")
        else:
            lines.append(f"| {r.engine} | {r.completions} | {r.completion_tokens} | {r.ended_with_eos} | "
                         f"{r.seconds:.2f} | {r.tokens_per_s:.1f} |")  # fmt: skip
    for name, ratio in ratios(results).items():
        lines.append(f"| {name} | | | | | {ratio:.2f}× |")
    from qwenkit.bench.train import environment_lines

    lines += ["", *environment_lines(env)]
    w = env.get("workload")
    if w:
        lines.append(f"workload: {w['model']}, {w['prompts']} prompts x G={w['num_generations']}, "
                     f"<= {w['max_completion_length']} new tokens, temperature {w['temperature']}")  # fmt: skip
    return "\n".join(lines)


def write_json(path: str | os.PathLike[str], results: Sequence[RolloutResult], env: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"environment": env, "results": [asdict(r) for r in results],
                                      "ratios": ratios(results)}, indent=1))  # fmt: skip


def _engines(s: str) -> list[str]:
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in ENGINES]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{s!r}: choose from {', '.join(ENGINES)}")
    return items


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qwenkit.bench.train import default_threads
    from qwenkit.loaders.catalog import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name, .gguf path (exported once) or HF folder")
    p.add_argument("--engines", default=["qwenkit", "trl"], type=_engines, help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--prompts", type=int, default=4, help="the first N MBPP+ tasks")
    p.add_argument("--data", default=None, help="MBPP+-style tasks JSONL (default: the packaged MBPP+)")
    p.add_argument("--num-generations", "-G", type=int, default=8, help="completions per prompt (TRL's G)")
    p.add_argument("--max-completion-length", type=int, default=256, help="new tokens per completion at most")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=default_threads(), help="torch threads (default: all cores)")
    p.add_argument("--json", default=None, help="write the environment, every result and the ratios here")


def cmd_rollout(args: argparse.Namespace) -> int:
    if args.prompts < 1 or args.num_generations < 1 or args.max_completion_length < 1 or args.temperature <= 0:
        raise SystemExit("need --prompts, --num-generations, --max-completion-length >= 1 and --temperature > 0")
    results, env = run_bench(args)
    print(format_report(results, env))
    if args.json:
        write_json(args.json, results, env)
        log(f"wrote {args.json}")
    return 1 if any(r.error for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return cmd_rollout(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
