"""Micro-benchmark of linear kernels on the real Qwen2.5 projection shapes.

Every candidate computes ``y = x @ W.T`` for x (M, K) fp32 -> y (M, N) fp32, so casts are part of
the cost. Weights are measured **cold**: enough copies of each weight are rotated through that
they never sit in the last-level cache (decode streams ~250 MB of weights per token, so cold is
the realistic case). Reports median µs, weight GB/s (bytes of the weight format / time) and
GFLOP/s (2·M·N·K / time).

    python -m qwenkit.bench.kernels --shapes qkv,gate_up --m 1,16,512 --threads 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from qwenkit.cpu import build, cgemv
from qwenkit.quant import kernels
from qwenkit.quant.numerics import (
    dequantize_int8,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
)

# (N, K) of y = x @ W.T for the 0.5B model
SHAPES_05B: dict[str, tuple[int, int]] = {
    "qkv": (1152, 896),
    "o": (896, 896),
    "gate_up": (9728, 896),
    "down": (896, 4864),
    "lm_head": (151936, 896),
}
SHAPES_15B: dict[str, tuple[int, int]] = {
    "qkv": (2048, 1536),
    "o": (1536, 1536),
    "gate_up": (17920, 1536),
    "down": (1536, 8960),
    "lm_head": (151936, 1536),
}
COLD_BYTES = 96 * 1024 * 1024  # 3x the 32 MB L3 of this machine


@dataclass
class KernelResult:
    shape: str
    n: int
    k: int
    m: int
    kernel: str
    us: float
    weight_gbps: float
    gflops: float


Runner = Callable[[torch.Tensor], torch.Tensor]


def _candidates(w: torch.Tensor) -> dict[str, tuple[Runner, int]]:
    """name -> (x -> y, bytes of weight read per call)."""
    n, k = w.shape
    out: dict[str, tuple[Runner, int]] = {}
    out["fp32"] = (lambda x, w=w: F.linear(x, w), w.numel() * 4)
    wb = w.to(torch.bfloat16)
    out["bf16"] = (lambda x, wb=wb: F.linear(x.to(torch.bfloat16), wb).float(), w.numel() * 2)
    q, s = quantize_int8_per_channel(w)
    p8 = kernels.Int8Weight.from_canonical(q, s)
    out["int8/bf16act"] = (p8.mm_bf16, n * k)
    if cgemv.available():
        out["int8/qwenkit-avx2"] = (lambda x, q=q, s=s: cgemv.gemm_int8(x, q, s, None), n * k)
        if cgemv.supports_q(k):
            qt = cgemv.pack_q8(q)
            out["int8/qwenkit-q8act"] = (lambda x, qt=qt, s=s: cgemv.gemm_q8(x, qt, s), n * k + n * 4)
    out["int8/deq+fp32"] = (p8.mm_dequant_fp32, n * k)
    dyn = kernels.DynamicInt8Weight.from_canonical(q, s)
    if dyn is not None:
        out["int8dyn/fbgemm"] = (dyn.mm, n * k)
    for g in (32, 128):
        if k % g:
            continue
        qp, sc, ze = quantize_int4_groupwise(w, g)
        p4 = kernels.Int4Weight.from_canonical(qp, sc, ze, g)
        out[f"int4g{g}/bf16act"] = (p4.mm_bf16, n * k // 2 + (k // g) * n * 4)
        out[f"int4g{g}/deq+fp32"] = (p4.mm_dequant_fp32, n * k // 2 + (k // g) * n * 4)
        if cgemv.available() and cgemv.supports_q(k, g):
            b4 = kernels.BlockInt4Weight.from_canonical(qp, sc, ze, g)
            out[f"int4g{g}/qwenkit-q8act"] = (b4.mm_q, n * k // 2 + (k // g) * n * 4)
    return out


def bench_shape(
    name: str, n: int, k: int, ms: list[int], repeats: int, only: set[str] | None
) -> list[KernelResult]:
    torch.manual_seed(0)
    w0 = torch.randn(n, k) * 0.02
    copies = max(1, min(8, COLD_BYTES // (n * k * 4) + 1))
    sets = [_candidates(w0 if i == 0 else w0 + 1e-4 * i) for i in range(copies)]
    results: list[KernelResult] = []
    for kname in sets[0]:
        if only and kname not in only:
            continue
        for m in ms:
            if kname == "bf16" and m > 64:
                continue  # collapses; minutes at M=512
            x = torch.randn(m, k)
            sets[0][kname][0](x)  # warm-up (packing caches, first-call init)
            times = []
            for _ in range(repeats):
                for s in sets:
                    t0 = time.perf_counter()
                    s[kname][0](x)
                    times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            nbytes = sets[0][kname][1]
            results.append(
                KernelResult(name, n, k, m, kname, t * 1e6, nbytes / t / 1e9, 2 * m * n * k / t / 1e9)
            )
        del x
    return results


def format_table(results: list[KernelResult]) -> str:
    ms = sorted({r.m for r in results})
    lines = [
        "| shape (N×K) | kernel | " + " | ".join(f"M={m} µs" for m in ms) + " | M=1 GB/s | M=max GFLOP/s |",
        "|---|---|" + "---|" * (len(ms) + 2),
    ]
    keys: list[tuple[str, str]] = []
    for r in results:
        if (r.shape, r.kernel) not in keys:
            keys.append((r.shape, r.kernel))
    for shape, kname in keys:
        rows = {r.m: r for r in results if r.shape == shape and r.kernel == kname}
        any_r = next(iter(rows.values()))
        cells = [f"{rows[m].us:.0f}" if m in rows else "–" for m in ms]
        gbps = f"{rows[ms[0]].weight_gbps:.1f}" if ms[0] in rows else "–"
        top = rows[max(rows)]
        lines.append(
            f"| {shape} {any_r.n}×{any_r.k} | {kname} | " + " | ".join(cells)
            + f" | {gbps} | {top.gflops:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["0.5b", "1.5b"], default="0.5b")
    ap.add_argument("--shapes", default="qkv,o,gate_up,down,lm_head")
    ap.add_argument("--m", default="1,4,16,64,512")
    ap.add_argument("--kernels", default="", help="comma list; default all")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = SHAPES_05B if args.model == "0.5b" else SHAPES_15B
    ms = [int(m) for m in args.m.split(",")]
    only = set(args.kernels.split(",")) if args.kernels else None
    results: list[KernelResult] = []
    print(f"qwenkit C kernels: {build.isa() or 'not built (torch kernels only)'}; {args.threads} threads", flush=True)
    with torch.inference_mode():
        for name in args.shapes.split(","):
            n, k = table[name]
            results += bench_shape(name, n, k, ms, args.repeats, only)
            print(format_table([r for r in results if r.shape == name]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
