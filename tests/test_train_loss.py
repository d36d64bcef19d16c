"""Training loss and gradients against transformers' Qwen2ForCausalLM (the oracle), packing and
the chunked LM-head loss. fp32 everywhere; tolerances are relative to the reference's scale."""
from __future__ import annotations

import torch

from qwenkit.model.layers import MergedLinear
from qwenkit.train.attention import DocumentAttention
from qwenkit.train.batch import IGNORE_INDEX
from qwenkit.train.loss import CausalLMLoss, linear_cross_entropy
from tests.tiny import make_hf_and_ours


def hf_named_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our gradients under HF names (fused q/k/v and gate/up split back)."""
    out: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        mod_name, leaf = name.rsplit(".", 1)
        mod = modules[mod_name]
        if isinstance(mod, MergedLinear):
            parent = mod_name.rsplit(".", 1)[0]
            for shard in mod.shard_names:
                out[f"{parent}.{shard}.{leaf}"] = p.grad[mod.shard_slice(shard)]
        else:
            out[name] = p.grad
    return out


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    t = torch.full_like(labels, IGNORE_INDEX)
    t[:, :-1] = labels[:, 1:]
    return t


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_loss_and_grads_match_transformers() -> None:
    ref, ours = make_hf_and_ours(seed=3)
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 40))
    labels = ids.clone()
    labels[0, :7] = IGNORE_INDEX  # a prompt without loss
    labels[1, 30:] = IGNORE_INDEX
    ref_loss = ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()

    targets = shifted_targets(labels)
    pos = torch.arange(40).expand(2, 40)
    docs = torch.zeros(2, 40, dtype=torch.long)
    loss_sum = CausalLMLoss(ours, chunk=7)(ids, pos, docs, targets)
    n = int((targets != IGNORE_INDEX).sum())
    (loss_sum / n).backward()

    assert abs(float(loss_sum.detach() / n) - float(ref_loss.detach())) <= 1e-5 * float(ref_loss)
    ours_g = hf_named_grads(ours)
    ref_g = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    assert set(ours_g) == set(ref_g)
    for k, g in ref_g.items():
        assert rel_err(ours_g[k], g) <= 1e-5, k


def test_packed_row_loss_equals_separate_documents() -> None:
    _, ours = make_hf_and_ours(seed=4)
    torch.manual_seed(1)
    lens = [9, 14, 5]
    docs = [torch.randint(0, 256, (n,)) for n in lens]
    separate = torch.zeros(())
    for d in docs:
        t = torch.full((1, len(d)), IGNORE_INDEX)
        t[0, :-1] = d[1:]
        separate = separate + CausalLMLoss(ours)(d[None], torch.arange(len(d))[None], torch.zeros(1, len(d), dtype=torch.long), t)
    row_len = sum(lens) + 4  # with padding at the end
    ids = torch.zeros(1, row_len, dtype=torch.long)
    tgt = torch.full((1, row_len), IGNORE_INDEX)
    pos = torch.zeros(1, row_len, dtype=torch.long)
    doc = torch.full((1, row_len), -1)
    o = 0
    for i, d in enumerate(docs):
        n = len(d)
        ids[0, o : o + n] = d
        tgt[0, o : o + n - 1] = d[1:]
        pos[0, o : o + n] = torch.arange(n)
        doc[0, o : o + n] = i
        o += n
    packed = CausalLMLoss(ours)(ids, pos, doc, tgt)
    assert abs(float(packed) - float(separate)) <= 1e-5 * float(separate)


def test_document_mask_is_block_diagonal_causal() -> None:
    doc = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = DocumentAttention(doc).mask[0, 0]
    expect = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(m, expect)


def test_chunked_loss_matches_full_logits_in_bf16_and_fp32() -> None:
    torch.manual_seed(2)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    t[3] = IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t, ignore_index=IGNORE_INDEX, reduction="sum")
    gh, gw = torch.autograd.grad(ref, (h, w))
    got = linear_cross_entropy(h, w, t, chunk=5)
    ch, cw = torch.autograd.grad(got, (h, w))
    assert rel_err(got, ref) <= 1e-6
    assert rel_err(ch, gh) <= 1e-5 and rel_err(cw, gw) <= 1e-5
    got16 = linear_cross_entropy(h, w, t, chunk=8, compute_dtype=torch.bfloat16)
    assert rel_err(got16, ref) <= 2e-2  # bf16 GEMM inputs
