"""Module swap on tiny random Qwen2 models: policies, ties, the engine as a drop-in, checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

from qwenkit.config import ModelConfig
from qwenkit import cpu
from qwenkit.cpu import cgemv
from qwenkit.engine.contiguous_cache import ContiguousKVCache
from qwenkit.loaders.quantized import load_quantized, save_quantized
from qwenkit.model import Qwen2ForCausalLM
from qwenkit.quant import (
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    parse,
    quantize_model,
    set_small_m,
)
from qwenkit.quant.quality import quantized_view
from tests.tiny import tiny_hf_config

# hidden 128 / FFN 256: every projection is int4-compatible with groups of 32 and 128
DIMS = {"hidden_size": 128, "intermediate_size": 256}
METHODS = ["int8", "int4-g32", "int4-g128", "mixed", "mixed-ffn8", "int4-g32,lm_head=int4-g32"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    cfg = ModelConfig.from_hf(tiny_hf_config(**{**DIMS, **overrides}))
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.05)
            if "norm" in name:
                p.add_(1.0)
    return model


def ids(b: int = 2, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def test_policy_parsing() -> None:
    p = parse("mixed")
    assert (p.qkv_proj, p.o_proj, p.gate_up_proj, p.down_proj, p.lm_head, p.embed_tokens) == (
        "int4-g32", "int8", "int4-g32", "int8", "int8", "int8",
    )  # fmt: skip
    assert parse(p.spec) == p
    assert parse("none").is_quantized is False
    assert parse("int4-g128,lm_head=none").lm_head == "none"
    with pytest.raises(ValueError, match="unknown module role"):
        parse("int8,mlp=int8")
    with pytest.raises(ValueError, match="not valid"):
        parse("int3")


def dequantized_twin(fp32: Qwen2ForCausalLM, quantized: Qwen2ForCausalLM) -> Qwen2ForCausalLM:
    """The fp32 model holding exactly the quantized model's (dequantized) weights."""
    twin = Qwen2ForCausalLM(fp32.config).eval()
    twin.load_state_dict(fp32.state_dict())
    qmods = dict(quantized.named_modules())
    with torch.no_grad():
        for name, m in twin.named_modules():
            q = qmods.get(name)
            if isinstance(q, (Int8Linear, Int4Linear, Int8Embedding)):
                m.weight.copy_(q.dequantize())
    return twin


@pytest.mark.parametrize("method", METHODS)
def test_swap_equals_fp32_model_with_dequantized_weights(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny()
    x = ids()
    with torch.no_grad():
        ref = model(x)
        fp32 = tiny()
        quantize_model(model, method)
        twin = dequantized_twin(fp32, model)
        want = twin(x)
        set_small_m(model, 10_000)
        got_kernel_path = model(x)  # the small-M kernels (int8 activations, or bf16 without C)
        set_small_m(model, 0)
        with monkeypatch.context() as mp:
            # without the C kernels every large-M linear dequantizes and runs fp32 GEMMs (with
            # them, int8 keeps its int8-activation kernel at every M)
            mp.setattr(cgemv, "available", lambda: False)
            got_fp32_path = model(x)
    policy = parse(method)
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Int4Linear if policy.qkv_proj.startswith("int4") else Int8Linear)
    assert next(model.parameters()).dtype == torch.float32  # what the engine reads
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert got_fp32_path.shape == ref.shape and got_fp32_path.dtype == torch.float32
    torch.testing.assert_close(got_fp32_path, want, rtol=1e-4, atol=1e-4)
    # activations rounded to 7 bits per block of 32 (int8 weights; 8 bits for int4, bf16 without
    # the C kernels) before each of the 4 layers' projections: ~2^-7 relative each
    rel = (got_kernel_path - want).norm() / want.norm()
    assert rel < 0.04, rel
    if method == "int8":  # loose sanity bound against the unquantized random model
        assert (got_fp32_path - ref).norm() / ref.norm() < 0.05


def test_tied_int8_head_shares_the_embedding_table() -> None:
    model = tiny(tie_word_embeddings=True)
    quantize_model(model, "int8")
    assert model.lm_head.qweight is model.model.embed_tokens.qweight


def test_quantized_view_shares_fp32_tensors() -> None:
    model = tiny()
    view = quantized_view(model, "int4-g32")
    assert view.model.norm.weight is model.model.norm.weight
    assert isinstance(model.lm_head, torch.nn.Linear) and not hasattr(model, "quant_policy")
    assert isinstance(view.lm_head, Int8Linear)


@pytest.mark.parametrize("method", ["int8", "mixed"])
def test_kv_cache_decode_matches_full_recompute(method: str) -> None:
    """Incremental decode == full recompute, up to activation codes that flip: the linears are
    batch-invariant (one kernel at every M), but attention over the cache (decode kernel) and
    over the whole prompt (SDPA) round differently in the last bits, and quantizing the next
    linear's activations can turn that into one step of one code (measured: up to 6% of the
    logits move, by <= 0.016; a wrong cache moves nearly all of them by O(1))."""
    model = quantize_model(tiny(seed=1), method)
    set_small_m(model, 0)  # one kernel for every M (also the torch fallback's large-M path)
    x = ids(2, 16, seed=3)
    cfg = model.config
    cache = ContiguousKVCache(cfg.num_hidden_layers, 2, 16, cfg.num_key_value_heads, cfg.head_dim)
    with torch.no_grad():
        full = model(x)
        steps = []
        cache.begin(10)
        steps.append(model(x[:, :10], torch.arange(10).expand(2, 10), cache))
        for t in range(10, 16):
            cache.begin(1)
            steps.append(model(x[:, t : t + 1], torch.full((2, 1), t), cache))
    diff = (torch.cat(steps, 1) - full).abs()
    assert float((diff > 1e-4 + 1e-4 * full.abs()).float().mean()) <= 0.15, diff.max()
    assert float(diff.max()) <= 0.05 * float(full.abs().max()), (diff.max(), full.abs().max())


def test_paged_engine_runs_a_quantized_model_unchanged() -> None:
    from qwenkit.engine.llm_engine import LLMEngine
    from tests.engine_helpers import greedy, naive_greedy, random_prompts, run_engine, token_ids

    model = quantize_model(tiny(seed=2), "mixed")
    with torch.no_grad():
        model.lm_head.scales.mul_(10.0)  # confident argmax (see tests/engine_helpers.py)
        model.lm_head.scales_bf16.mul_(10.0)
    set_small_m(model, 0)  # same kernel at every batch size
    prompts = random_prompts(6, 1, 30, seed=4)
    want = [naive_greedy(model, p, 6) for p in prompts]
    engine = LLMEngine(model, None, kv_cache_memory="1MiB", max_num_seqs=4, max_num_batched_tokens=32)
    got = token_ids(run_engine(engine, prompts, greedy(6), stagger=2))
    # The engine's tokens, teacher-forced through the oracle (full recompute): each must be the
    # oracle's argmax or tie with it within MARGIN. int8 activations can turn last-bit
    # differences of attention (paged decode kernel vs the oracle's prompt attention) into one
    # code step (see test_kv_cache_decode_matches_full_recompute: <= 0.016 per unit of logit
    # scale, x10 here), enough to flip a near tie; a wrong KV cache misses by whole logits.
    margin = 0.5
    for p, toks in zip(prompts, got):
        with torch.no_grad():
            logits = model(torch.tensor(p + toks), torch.arange(len(p) + len(toks)))  # (T, V)
        pred = logits[len(p) - 1 : -1]  # the logits each generated token was chosen from
        chosen = pred.gather(-1, torch.tensor(toks)[:, None])[:, 0]
        assert bool((pred.max(-1).values - chosen <= margin).all()), (p, toks)
    assert sum(a == b for w, g in zip(want, got) for a, b in zip(w, g)) >= 0.8 * sum(map(len, want))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("method", ["int8", "mixed", "int4-g128,lm_head=int4-g32,embed_tokens=none", "int8,lm_head=none"])
def test_checkpoint_round_trip(tmp_path, method: str, tie: bool) -> None:
    model = quantize_model(tiny(seed=5, tie_word_embeddings=tie), method)
    x = ids(1, 20, seed=6)
    save_quantized(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "qwenkit"
    assert cfg["quantization_config"]["modules"] == model.quant_policy.as_dict()
    loaded = load_quantized(tmp_path, model.config)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))  # bit-exact: codes and scales are stored as-is
        assert torch.equal(loaded(x[:, :3]), model(x[:, :3]))  # small-M kernel too
    assert loaded.quant_policy == model.quant_policy
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_loads_through_qwenkit_load(tmp_path) -> None:
    """`qwenkit.loaders.load.load(DIR)` sees quantization_config and does not re-quantize."""
    from qwenkit.loaders.load import load

    from tokenizers import Tokenizer, models

    model = quantize_model(tiny(seed=7), "int4-g32")
    save_quantized(model, tmp_path)
    # load() reads a tokenizer too: a 3-word stand-in (not used here)
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").unlink()  # its Qwen EOS ids are outside that vocab
    lm = load(tmp_path, progress=False, quantization="int8")
    cpu.install(model)  # load() swaps in the CPU runtime's fused modules: compare like with like
    x = ids(1, 12)
    with torch.no_grad():
        assert torch.equal(lm.model(x), model(x))
    assert isinstance(lm.model.model.layers[0].mlp.gate_up_proj, Int4Linear)


def test_checkpoint_rejects_unknown_tensors(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from qwenkit.errors import ModelIntegrityError

    model = quantize_model(tiny(), "int8")
    save_quantized(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelIntegrityError, match="unexpected"):
        load_quantized(tmp_path, model.config)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_quantize_while_loading_equals_quantize_after_loading(tie: bool) -> None:
    """Quantizing each module as its last tensor arrives (the loader's path, which never holds
    the whole fp32 model) gives the same model as loading everything and then quantizing, in
    any tensor order; modules are really swapped during the stream, not at the end."""
    import random

    from qwenkit.loaders.load import build_empty_model
    from qwenkit.quant.convert import quantize_while_loading

    src = tiny(seed=7, tie_word_embeddings=tie)
    tensors = [(n, t.clone()) for n, t in src.hf_state_dict()]
    random.Random(3).shuffle(tensors)
    ref = build_empty_model(src.config, torch.float32, "cpu")
    ref.load_weights((n, t.clone()) for n, t in tensors)
    quantize_model(ref, "mixed")

    model = build_empty_model(src.config, torch.float32, "cpu")
    swapped_during_stream = []

    def watched():
        for item in quantize_while_loading(model, "mixed", iter([(n, t.clone()) for n, t in tensors])):
            swapped_during_stream.append(sum(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules()))
            yield item

    loaded = model.load_weights(watched(), adopt=True)
    assert loaded >= {n for n, _ in model.named_parameters()}
    quantize_model(model, "mixed")
    assert swapped_during_stream[-1] >= 4 * model.config.num_hidden_layers - 4  # all but the last few
    assert model.quant_policy == ref.quant_policy
    x = ids(1, 12, seed=8)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    if tie:
        assert model.lm_head.qweight is model.model.embed_tokens.qweight
