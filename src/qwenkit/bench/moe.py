"""Qwen2-MoE decode speed: qwenkit's engine vs transformers' `Qwen2MoeForCausalLM.generate`, on
one random tiny-but-not-toy config, same weights, same run, same prompt.

The model: a random transformers `Qwen2MoeForCausalLM` (seeded; default hidden 1024, 8 layers,
16 experts top-4, expert width 512, shared expert 2048, vocab 32768); qwenkit's model loads its
state dict (so both hold the same weights).

Engines (each after an untimed warm-up; the timed runs go round robin over the engines):
- ``qwenkit``: `LLM` over the fp32 model with the CPU runtime's fused modules (`cpu.install`);
- ``qwenkit-int8``: the same with int8 weights (the routed experts' and shared expert's linears
  too; the routers stay fp32);
- ``transformers``: `generate` (greedy, KV cache) on the fp32 model under `torch.no_grad`.

Decode tokens/s = (N - 1) / (time from the first new token to the N-th): qwenkit's engine is stepped
and transformers' `generate` streams its tokens (a `BaseStreamer`), so the prefill stays out.
Greedy, EOS ignored, one stream, the best of `--repeats` runs. Printed as a table with the CPU
flags and each qwenkit row's ratio to transformers; `--json` writes everything.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

ENGINES = ("qwenkit", "qwenkit-int8", "transformers")


def log(msg: str) -> None:
    print(f"[bench moe] {msg}", file=sys.stderr, flush=True)


@dataclass
class MoeResult:
    engine: str
    new_tokens: int = 0
    first_token_s: float = 0.0  # prefill + first token (of the best run)
    decode_s: float = 0.0  # first to last new token (best run)
    decode_tokens_per_s: float = 0.0
    error: str = ""


def hf_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": 4096, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "use_sliding_window": False, "num_experts": args.num_experts,
        "num_experts_per_tok": args.top_k, "moe_intermediate_size": args.moe_intermediate_size,
        "shared_expert_intermediate_size": args.shared_expert_intermediate_size, "norm_topk_prob": False,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "bos_token_id": 0, "eos_token_id": 1,
    }  # fmt: skip


def _record(res: MoeResult, stamps: list[float], t0: float, n: int) -> None:
    """Keep the run (first-token time, first-to-last decode time) if it is the fastest decode."""
    if len(stamps) != n:
        raise RuntimeError(f"expected {n} new tokens, got {len(stamps)}")
    decode = stamps[-1] - stamps[0]
    if not res.decode_s or decode < res.decode_s:
        res.new_tokens = n
        res.first_token_s, res.decode_s = stamps[0] - t0, decode
        res.decode_tokens_per_s = (n - 1) / decode


def _engine_stamps(engine: Any, prompt: list[int], n: int) -> list[float]:
    """Step qwenkit's engine on one request; the time each new token appeared."""
    from qwenkit.sampling_params import SamplingParams

    engine.add_request("bench", {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    stamps: list[float] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            stamps += [now] * (len(out.outputs[0].token_ids) - len(stamps))
    return stamps


def _hf_stamps(model: Any, prompt: list[int], n: int) -> list[float]:
    """transformers' greedy generate; a streamer stamps each new token."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.calls: list[float] = []

        def put(self, value: Any) -> None:
            self.calls.append(time.perf_counter())

        def end(self) -> None:
            pass

    s = Stamps()
    with torch.no_grad():
        model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, streamer=s)  # fmt: skip
    return s.calls[1:]  # the first put is the prompt


def run_bench(args: argparse.Namespace) -> tuple[list[MoeResult], dict[str, Any]]:
    import torch
    import transformers

    from qwenkit import cpu
    from qwenkit.bench.train import environment
    from qwenkit.config import ModelConfig
    from qwenkit.engine.llm_engine import LLMEngine
    from qwenkit.model import Qwen2MoeForCausalLM
    from qwenkit.quant import quantize_model

    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    log(f"CPU: {env['cpu']} [{' '.join(env['cpu_flags'])}], {args.threads} threads")
    cfg = hf_config(args)
    torch.manual_seed(args.seed)
    ref = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**cfg)).eval()
    active = sum(p.numel() for n, p in ref.named_parameters() if ".experts." not in n)
    expert_params = sum(p.numel() for n, p in ref.named_parameters() if ".experts." in n)
    env["workload"] = {
        "config": cfg, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
        "params_total": active + expert_params,
        "params_active_per_token": active + expert_params * args.top_k // args.num_experts,
        "transformers_attn": ref.config._attn_implementation,
        "transformers_experts": getattr(ref.config, "_experts_implementation", None),
    }  # fmt: skip
    log(f"model: {env['workload']['params_total'] / 1e6:.0f}M params, "
        f"{env['workload']['params_active_per_token'] / 1e6:.0f}M active per token")  # fmt: skip
    prompt = torch.randint(2, args.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    results = {e: MoeResult(e) for e in args.engines}
    gens: dict[str, Any] = {}
    for engine in args.engines:
        try:
            if engine == "transformers":
                gens[engine] = lambda k: _hf_stamps(ref, prompt, k)
            else:
                model = Qwen2MoeForCausalLM(ModelConfig.from_hf(cfg)).eval()
                model.load_weights(ref.state_dict().items())
                if engine == "qwenkit-int8":
                    quantize_model(model, "int8")
                cpu.install(model)
                gens[engine] = functools.partial(_engine_stamps, LLMEngine(model, None, max_num_seqs=1), prompt)
            gens[engine](2)  # warm-up
        except Exception as e:  # reported in the table, not a crash of the whole run
            import traceback

            traceback.print_exc()
            results[engine].error = f"{type(e).__name__}: {e}"
            gens.pop(engine, None)
    # round robin: a load change on the (shared) machine hits every engine alike
    for r in range(args.repeats):
        for engine, gen in gens.items():
            t0 = time.perf_counter()
            _record(results[engine], gen(args.max_tokens), t0, args.max_tokens)
            log(f"run {r + 1}/{args.repeats} {engine}: best {results[engine].decode_tokens_per_s:.1f} decode tok/s")
    gens.clear()
    gc.collect()
    return list(results.values()), env


def ratios(results: Sequence[MoeResult]) -> dict[str, float]:
    ok = {r.engine: r for r in results if not r.error and r.decode_tokens_per_s}
    base = ok.get("transformers")
    if base is None:
        return {}
    return {f"{e} / transformers": r.decode_tokens_per_s / base.decode_tokens_per_s
            for e, r in ok.items() if e != "transformers"}  # fmt: skip


def format_report(results: Sequence[MoeResult], env: dict[str, Any]) -> str:
    lines = ["| engine | new tokens | first token s | decode s | decode tok/s |", "|---|---|---|---|---|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.engine} | error: {r.error} | | | |")
        else:
            lines.append(f"| {r.engine} | {r.new_tokens} | {r.first_token_s:.3f} | {r.decode_s:.3f} | "
                         f"{r.decode_tokens_per_s:.1f} |")  # fmt: skip
    for name, ratio in ratios(results).items():
        lines.append(f"| {name} | | | | {ratio:.2f}x |")
    from qwenkit.bench.train import environment_lines

    lines += ["", *environment_lines(env)]
    w = env.get("workload")
    if w:
        c = w["config"]
        lines.append(f"model: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_experts']} experts "
                     f"top-{c['num_experts_per_tok']} (width {c['moe_intermediate_size']}), shared expert "
                     f"{c['shared_expert_intermediate_size']}, vocab {c['vocab_size']}: "
                     f"{w['params_total'] / 1e6:.0f}M params, {w['params_active_per_token'] / 1e6:.0f}M active; "
                     f"prompt {w['prompt_len']} tokens, {w['max_tokens']} new")  # fmt: skip
    return "\n".join(lines)


def _engines(s: str) -> list[str]:
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in ENGINES]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{s!r}: choose from {', '.join(ENGINES)}")
    return items


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", default=list(ENGINES), type=_engines, help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4, help="num_experts_per_tok")
    p.add_argument("--moe-intermediate-size", type=int, default=512)
    p.add_argument("--shared-expert-intermediate-size", type=int, default=2048)
    p.add_argument("--intermediate-size", type=int, default=2816, help="dense layers' width (none by default)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per timed generation")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine (the best counts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the environment, every result and the ratios here")


def cmd_moe(args: argparse.Namespace) -> int:
    if args.max_tokens < 2 or args.prompt_len < 1 or args.repeats < 1:
        raise SystemExit("need --max-tokens >= 2, --prompt-len >= 1 and --repeats >= 1")
    if args.top_k > args.num_experts:
        raise SystemExit(f"--top-k {args.top_k} exceeds --num-experts {args.num_experts}")
    results, env = run_bench(args)
    print(format_report(results, env))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"environment": env, "results": [asdict(r) for r in results],
                                               "ratios": ratios(results)}, indent=1))  # fmt: skip
        log(f"wrote {args.json}")
    return 1 if any(r.error for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return cmd_moe(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
