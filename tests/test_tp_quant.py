"""Tensor parallel over quantized (int8 / int4) linears against the one-process quantized model.

Tiny random Qwen2 (hidden 256, intermediate 512: every rank's input columns start on a
32- and 128-column boundary, so each rank quantizes its activations in the same blocks as one
process does), 2 gloo processes x 1 thread. Oracles: the one-process quantized layer's codes
(bit-exact slices) and its logits / greedy tokens.
"""
from __future__ import annotations

import copy
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qwenkit.config import ModelConfig
from qwenkit.model import Qwen2ForCausalLM
from qwenkit.quant import quantize_model
from tests.tiny import tiny_hf_config
from tests.engine_helpers import prompt_logprob_values

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, vocab_size=301)  # fmt: skip
# Logits: the one-process quantized model's. Each rank quantizes its activations in the same
# blocks as one process and holds the same codes, so TP only changes the order of the fp32 sums
# (the row-parallel all-reduce adds two partial sums): fp32's bound holds (measured: 2-3e-7). A
# sum landing on the other side of a rounding boundary of the next layer's int8 activation codes
# would exceed it; with these fixed seeds none does.
QUANT_RTOL = 1e-5


def _quantized(method: str, seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(ModelConfig.from_hf(tiny_hf_config(**{**CONFIG, **overrides}))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return quantize_model(model, method)


def _canon(m) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in m.canonical_state().items()}


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_each_rank_holds_the_exact_slice_of_the_one_process_codes(method: str) -> None:
    """No process group needed: the shards are built, not run. int4 = int4-g32 linears, int8 head."""
    from qwenkit.parallel import apply_tensor_parallel

    ref = _quantized(method)
    cfg = ref.config
    d, n = cfg.head_dim, 2
    for r in range(n):
        tp = apply_tensor_parallel(copy.deepcopy(ref), r, n)
        a_ref, a = ref.model.layers[1].self_attn, tp.model.layers[1].self_attn
        q = (r * 2 * d, (r + 1) * 2 * d)  # 4 q heads, 2 KV heads: 2 q heads and 1 KV head a rank
        kv = (r * d, (r + 1) * d)
        qkv_rows = torch.cat([torch.arange(*q), 4 * d + torch.arange(*kv), 6 * d + torch.arange(*kv)])
        want, got = _canon(a_ref.qkv_proj), _canon(a.qkv_proj)
        for key in want:
            assert torch.equal(got[key], want[key][qkv_rows]), f"qkv_proj {key} rank {r}"
        assert torch.equal(a.qkv_proj.bias, a_ref.qkv_proj.bias[qkv_rows])
        m_ref, m = ref.model.layers[1].mlp, tp.model.layers[1].mlp
        inter = cfg.intermediate_size // n
        cols = slice(r * inter, (r + 1) * inter)
        want, got = _canon(m_ref.down_proj), _canon(m.down_proj.local)
        if method == "int8":  # per-row scales, the rank's columns
            assert torch.equal(got["qweight"], want["qweight"][:, cols])
            assert torch.equal(got["scales"], want["scales"])
        else:  # 32-column groups: nibble pairs and group scales / zeros of the rank's columns
            g = m_ref.down_proj.group_size
            assert torch.equal(got["qweight"], want["qweight"][:, cols.start // 2 : cols.stop // 2])
            for key in ("scales", "zeros"):
                assert torch.equal(got[key], want[key][:, cols.start // g : cols.stop // g])
        per = -(-cfg.vocab_size // n)
        lo, hi = r * per, min((r + 1) * per, cfg.vocab_size)
        want, got = _canon(ref.lm_head), _canon(tp.lm_head.local)
        assert torch.equal(got["qweight"][: hi - lo], want["qweight"][lo:hi])
        assert torch.equal(got["scales"][: hi - lo], want["scales"][lo:hi])
        assert not got["qweight"][hi - lo :].any()  # padding rows of the last rank
        assert torch.equal(tp.model.embed_tokens.table.row_major()[: hi - lo], ref.model.embed_tokens.row_major()[lo:hi])


def test_a_split_that_cuts_int4_groups_is_refused_with_the_layer_and_group_named() -> None:
    from qwenkit.parallel import TensorParallelError, check_tensor_parallel

    model = _quantized("int4-g128")  # o_proj: 256 columns -> 128 a rank: fine; down_proj: 512 -> 128: fine
    check_tensor_parallel(model.config, 2, model)
    with pytest.raises(TensorParallelError, match=r"model\.layers\.0\.self_attn\.o_proj.*groups of 128"):
        check_tensor_parallel(model.config, 4, model)  # 64 columns a rank


def _worker(port: int, models: list[Qwen2ForCausalLM], x: torch.Tensor) -> None:
    from qwenkit.parallel import apply_tensor_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        with torch.no_grad():
            for model in models:
                apply_tensor_parallel(model, 1, 2)(x)
    finally:
        dist.destroy_process_group()


def test_quantized_tp2_logits_equal_the_one_process_quantized_model() -> None:
    """int8 and int4-g32 (tied int8 head + embedding in the int8 case): max relative logit error
    <= QUANT_RTOL over a 24-token prompt (prefill rows) and a single row (decode shapes)."""
    from qwenkit.engine.parallel import _free_port
    from qwenkit.parallel import apply_tensor_parallel

    models = [_quantized("int8", tie_word_embeddings=True), _quantized("int4")]
    x = torch.randint(0, CONFIG["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(1))
    port = _free_port()
    worker = mp.get_context("spawn").Process(target=_worker, args=(port, [copy.deepcopy(m) for m in models], x))
    worker.start()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        for method, model in zip(("int8", "int4"), models):
            with torch.no_grad():
                ref = model(x)
                got = apply_tensor_parallel(copy.deepcopy(model), 0, 2)(x)
            rel = ((got - ref).abs().max() / ref.abs().max()).item()
            print(f"{method}: max relative logit error {rel:.2e}")
            assert rel <= QUANT_RTOL, f"{method}: max relative error {rel:.2e}"
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
    finally:
        dist.destroy_process_group()
        worker.join(timeout=30)
    assert worker.exitcode == 0


ENGINE = dict(block_size=4, kv_cache_memory="4MiB", max_num_batched_tokens=32, max_num_seqs=4)


def test_quantized_tp2_greedy_through_llm_equals_one_process() -> None:
    """The "mixed" policy (int4-g32 qkv / gate_up, int8 o / down / head: both formats, both
    splits): 16 greedy tokens x 2 prompts (chunked prefill) identical to the one-process
    quantized engine (plain modules on both sides); prompt log-probs within rel 1e-4 / abs 1e-5."""
    from qwenkit.engine.llm import LLM
    from qwenkit.sampling_params import SamplingParams

    model = _quantized("mixed", seed=3)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, CONFIG["vocab_size"], (n,), generator=g).tolist() for n in (6, 27)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, prompt_logprobs=0)
    ref = LLM(copy.deepcopy(model), install_cpu_runtime=False, **ENGINE).generate(prompts, params, use_tqdm=False)
    llm = LLM(copy.deepcopy(model), tensor_parallel_size=2, **ENGINE)
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    for r, o in zip(ref, got):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        p_ref = prompt_logprob_values(r)
        p_got = prompt_logprob_values(o)
        assert p_got == pytest.approx(p_ref, rel=1e-4, abs=1e-5)


def test_auto_quantization_under_tp_loads_int8(tiny_hf_dir) -> None:
    """`LLM(path, tensor_parallel_size=2)` with the default quantization ('auto') shards int8
    linears (tied int8 head + embedding), and its greedy tokens equal one process's (default
    engine: 'auto' too, fused CPU runtime)."""
    from qwenkit.engine.llm import LLM
    from qwenkit.quant.linear import Int8Linear
    from qwenkit.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7], list(range(10, 40))]
    ref = LLM(str(tiny_hf_dir), **ENGINE).generate(prompts, params, use_tqdm=False)
    llm = LLM(str(tiny_hf_dir), tensor_parallel_size=2, **ENGINE)
    try:
        attn = llm.llm_engine.model.model.layers[0].self_attn
        assert isinstance(attn.qkv_proj, Int8Linear) and isinstance(attn.o_proj.local, Int8Linear)
        got = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [r.outputs[0].token_ids for r in ref]


@pytest.mark.slow
def test_real_05b_int8_tp2_greedy_equals_one_process(gguf_05b_path) -> None:
    """The real 0.5B, int8: TP = 2 (2 processes x 1 thread) vs one process (2 threads, fused CPU
    runtime): greedy 32 tokens x 2 prompts identical. Prompt log-probs: not only summation order
    here. The 0.5B's o_proj gives each rank 448 input columns, not a multiple of the int8
    kernel's 128-column activation blocks, so the block straddling the split is quantized as two
    blocks (down_proj's 2432 columns are aligned: 1e-6 relative there). So the bound is the
    quantized one: TP's distance to one-process int8 is at most int8's own distance to fp32."""
    import gc

    from qwenkit.engine.llm import LLM
    from qwenkit.sampling_params import SamplingParams

    prompts = ["def fibonacci(n):\n    ", "# Sort a list of dicts by key\n"]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, prompt_logprobs=0)
    first = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)

    def prompt_lps(outs: list) -> torch.Tensor:
        return torch.tensor([next(iter(d.values())).logprob for o in outs for d in o.prompt_logprobs[1:]])

    torch.set_num_threads(2)
    runs = {}
    for fmt in ("none", "int8"):
        llm = LLM(str(gguf_05b_path), quantization=fmt, kv_cache_memory="128MiB")
        # fp32: only its prompt log-probs are used
        runs[fmt] = llm.generate(prompts, params if fmt == "int8" else first, use_tqdm=False)
        del llm
        gc.collect()
    torch.set_num_threads(1)
    llm = LLM(str(gguf_05b_path), tensor_parallel_size=2, quantization="int8", kv_cache_memory="128MiB")
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    tp_diff = (prompt_lps(got) - prompt_lps(runs["int8"])).abs()
    q_diff = (prompt_lps(runs["int8"]) - prompt_lps(runs["none"])).abs()
    print(f"prompt log-probs |TP int8 - int8| max {tp_diff.max():.3f} mean {tp_diff.mean():.4f}; "
          f"|int8 - fp32| max {q_diff.max():.3f} mean {q_diff.mean():.4f}")
    for r, o in zip(runs["int8"], got):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
    assert tp_diff.max() <= q_diff.max() and tp_diff.mean() <= q_diff.mean()
