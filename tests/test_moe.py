"""Qwen2-MoE against transformers' Qwen2MoeForCausalLM on tiny random configs: logits from an HF
folder written by save_pretrained, greedy through the engine, the load-balancing aux loss (alone
and inside the trainer's loss), expert parallel over 2 gloo processes, and a tiny GGUF qwen2moe."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qwenkit.config import ConfigError, ModelConfig
from qwenkit.model import Qwen2MoeForCausalLM, causal_lm_class
from qwenkit.model.qwen2_moe import Qwen2MoeSparseMoeBlock
from tests.tiny import tiny_hf_config

LOGITS_TOL = 1e-5  # fp32, max abs difference (logits are O(1))
AUX_TOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def moe_hf_config(**overrides: Any) -> dict[str, Any]:
    """8 experts, top-2, shared expert; layer 0 dense (mlp_only_layers), layers 1 and 3 sparse
    (decoder_sparse_step 2), layer 2 dense by the step."""
    cfg = tiny_hf_config(
        architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=64, shared_expert_intermediate_size=96, decoder_sparse_step=2,
        mlp_only_layers=[0], norm_topk_prob=False, router_aux_loss_coef=0.02, qkv_bias=True,
    )  # fmt: skip
    cfg.update(overrides)
    return cfg


def make_ref(seed: int = 0, head_scale: float = 1.0, **overrides: Any):
    """A random transformers Qwen2MoeForCausalLM (eager attention, fp32) and its config dict."""
    import transformers

    cfg = moe_hf_config(**overrides)
    torch.manual_seed(seed)
    ref = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**cfg, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)  # HF's zero biases / unit norms would hide bugs
            if name.endswith("mlp.gate.weight"):
                p.mul_(20.0)  # a router with clear preferences: top-k far from ties
        ref.lm_head.weight.mul_(head_scale)
    return ref, cfg


def ours_from(ref, cfg: dict[str, Any]) -> Qwen2MoeForCausalLM:
    model = Qwen2MoeForCausalLM(ModelConfig.from_hf(cfg)).eval()
    loaded = model.load_weights(ref.state_dict().items())  # transformers' stacked expert tensors
    assert loaded == {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return model


def save_hf_folder(ref, out: Path, tokenizer_dir: Path) -> Path:
    ref.save_pretrained(out)  # per-expert checkpoint names (transformers' original format)
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


# ---------------------------------------------------------------------------------- config
def test_config_fields_and_layout_follow_transformers() -> None:
    import transformers

    cfg = moe_hf_config(norm_topk_prob=True, num_hidden_layers=6, mlp_only_layers=[3], output_router_logits=True)
    ours = ModelConfig.from_hf(cfg)
    hf = transformers.Qwen2MoeConfig(**ours.to_hf())
    for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
              "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef",
              "output_router_logits"):  # fmt: skip
        assert getattr(hf, k) == cfg[k], k
    assert ours.model_type == "qwen2_moe" and causal_lm_class(ours) is Qwen2MoeForCausalLM
    ref = transformers.Qwen2MoeForCausalLM(hf)
    model = Qwen2MoeForCausalLM(ours)
    theirs = ["Sparse" in type(l.mlp).__name__ for l in ref.model.layers]
    mine = [isinstance(l.mlp, Qwen2MoeSparseMoeBlock) for l in model.model.layers]
    assert mine == theirs == [False, True, False, False, False, True]


@pytest.mark.parametrize(
    "overrides, field",
    [({"num_experts_per_tok": 9}, "num_experts_per_tok"), ({"num_experts": 0}, "num_experts"),
     ({"decoder_sparse_step": 0}, "decoder_sparse_step"), ({"model_type": "mixtral"}, "mixtral"),
     ({"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window")],
)  # fmt: skip
def test_bad_config_names_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf(moe_hf_config(**overrides))


# ---------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_logits_equal_transformers_from_saved_folder(tmp_path: Path, tiny_tokenizer_dir: Path, norm_topk_prob: bool) -> None:
    from qwenkit.loaders.load import load

    ref, cfg = make_ref(seed=1, norm_topk_prob=norm_topk_prob)
    folder = save_hf_folder(ref, tmp_path / "hf", tiny_tokenizer_dir)
    loaded = load(folder, dtype=torch.float32, quantization="none", progress=False)
    assert type(loaded.model) is Qwen2MoeForCausalLM and loaded.config.moe.norm_topk_prob is norm_topk_prob
    ids = torch.randint(0, cfg["vocab_size"], (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        got = loaded.model(ids)
        got_mem = ours_from(ref, cfg)(ids)  # the stacked in-memory layout loads the same
    assert (got - want).abs().max().item() <= LOGITS_TOL
    assert (got_mem - want).abs().max().item() <= LOGITS_TOL
    # the exporter writes transformers' names back: the export loads into transformers again
    import transformers

    from qwenkit.loaders.hf import export_hf

    out = export_hf(loaded.model, tmp_path / "export")
    again = transformers.Qwen2MoeForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        assert (again(ids).logits - want).abs().max().item() <= LOGITS_TOL


def test_checkpoint_with_unknown_expert_is_refused() -> None:
    ref, cfg = make_ref()
    model = Qwen2MoeForCausalLM(ModelConfig.from_hf(cfg))
    w = ref.state_dict()["model.layers.1.mlp.shared_expert.down_proj.weight"]
    with pytest.raises(KeyError, match="expert 8 >= num_experts=8"):
        model.load_weights([("model.layers.1.mlp.experts.8.down_proj.weight", w)])


# ---------------------------------------------------------------------------------- engine
def test_engine_greedy_equals_transformers_and_full_recompute(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    from qwenkit.engine.llm import LLM
    from qwenkit.loaders.load import load
    from tests.engine_helpers import greedy, naive_greedy, random_prompts

    ref, cfg = make_ref(seed=2, head_scale=10.0, norm_topk_prob=True)  # 10x head: no near-tie argmax
    folder = save_hf_folder(ref, tmp_path / "hf", tiny_tokenizer_dir)
    loaded = load(folder, dtype=torch.float32, quantization="none", progress=False)
    prompts = random_prompts(5, 2, 30, vocab=cfg["vocab_size"], seed=3)
    n = 12
    llm = LLM(loaded, max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory="4MiB")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(n), use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == [naive_greedy(loaded.model, p, n) for p in prompts]
    with torch.no_grad():
        want = [ref.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)[0, len(p):].tolist() for p in prompts]  # fmt: skip
    assert got == want


def test_int8_experts_are_quantized_and_close(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    from qwenkit.loaders.load import load
    from qwenkit.quant.linear import QuantizedLinear

    ref, cfg = make_ref(seed=4)
    folder = save_hf_folder(ref, tmp_path / "hf", tiny_tokenizer_dir)
    q = load(folder, dtype=torch.float32, quantization="int8", progress=False).model
    block = q.model.layers[1].mlp
    assert isinstance(block.experts[3].down_proj, QuantizedLinear)
    assert isinstance(block.experts[3].gate_up_proj, QuantizedLinear)
    assert type(block.gate) is torch.nn.Linear  # the router stays fp32: routing must not flip
    ids = torch.randint(0, cfg["vocab_size"], (1, 19), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want, got = ref(ids).logits, q(ids)
    # weight-only int8: 8.8e-3 max abs on logits of max 0.58 for this model (the bound is 2.3x that)
    assert (got - want).abs().max().item() <= 2e-2


# ---------------------------------------------------------------------------------- training
def test_aux_loss_equals_transformers_with_padding() -> None:
    ref, cfg = make_ref(seed=5, norm_topk_prob=False)
    ours = ours_from(ref, cfg)
    ref.train(), ours.train()
    ids = torch.randint(0, cfg["vocab_size"], (3, 16), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[2, 5:] = 0  # right padding, as the trainer packs rows
    out = ref(ids, attention_mask=mask, output_router_logits=True)
    ours.hidden_states(ids)
    got = ours.router_aux_loss(mask) / cfg["router_aux_loss_coef"]
    assert abs(got.item() - out.aux_loss.item()) <= AUX_TOL
    out_nomask = ref(ids, output_router_logits=True)
    ours.hidden_states(ids)
    assert abs((ours.router_aux_loss() / cfg["router_aux_loss_coef"]).item() - out_nomask.aux_loss.item()) <= AUX_TOL
    # the gradient flows into the routers through the probabilities, as in transformers
    ours.router_aux_loss(mask).backward()
    assert ours.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    ours.eval()
    with torch.no_grad():
        ours.hidden_states(ids)
    assert ours.router_aux_loss() is None  # inference records nothing (no stale logits)


def test_trainer_loss_adds_coef_times_aux_like_transformers() -> None:
    from qwenkit.train.batch import IGNORE_INDEX, Batch
    from qwenkit.train.loss import CausalLMLoss

    ref, cfg = make_ref(seed=7, norm_topk_prob=True)
    ours = ours_from(ref, cfg)
    ref.train(), ours.train()
    b, t = 2, 14
    ids = torch.randint(1, cfg["vocab_size"], (b, t), generator=torch.Generator().manual_seed(8))
    lengths = [14, 9]
    mask = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask  # padding id 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    batch = Batch(ids, targets, torch.arange(t).expand(b, t).contiguous(), torch.where(mask.bool(), 0, -1))
    want = ref(ids, attention_mask=mask, labels=labels, output_router_logits=True).loss
    got = CausalLMLoss(ours)(batch) / batch.num_target_tokens
    assert abs(got.item() - want.item()) <= LOGITS_TOL


def test_train_cli_runs_on_an_moe_checkpoint(tmp_path: Path, tiny_tokenizer_dir: Path, tiny_tokenizer) -> None:
    """`qwenkit train sft` on a qwen2_moe folder: the loss path carries the aux hook, the
    checkpoint is a qwen2_moe folder again."""
    import json

    from qwenkit.cli.main import main
    from qwenkit.loaders.load import load
    from tests.test_train_loop import base_args

    ref, _ = make_ref(seed=13, vocab_size=len(tiny_tokenizer), bos_token_id=tiny_tokenizer.pad_token_id,
                      eos_token_id=tiny_tokenizer.eos_token_id)  # fmt: skip
    folder = save_hf_folder(ref, tmp_path / "hf", tiny_tokenizer_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Count to {i}:", "completion": " " + " ".join(map(str, range(i + 1)))})
                            + "\n" for i in range(8)))  # fmt: skip
    out = tmp_path / "run"
    assert main(base_args(folder, data, out, "--max-steps", "2")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    saved = load(out / "checkpoint-000002", progress=False)
    assert type(saved.model) is Qwen2MoeForCausalLM and saved.config.moe == ModelConfig.from_hf(
        json.loads((folder / "config.json").read_text())).moe


# ---------------------------------------------------------------------------------- expert parallel
def _ep_worker(rank: int, world: int, rdv: str, state_path: str, ids_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    try:
        cfg, state = torch.load(state_path)
        model = Qwen2MoeForCausalLM(ModelConfig.from_hf(cfg), ep_group=dist.group.WORLD).eval()
        loaded = model.load_weights(state.items())
        assert loaded == {n for n, _ in model.named_parameters(remove_duplicate=False)}
        with torch.no_grad():
            logits = model(torch.load(ids_path))
        try:  # training through the all-reduce would give wrong gradients: refused
            model(torch.load(ids_path))
            refused = False
        except NotImplementedError:
            refused = True
        experts = sorted({n.split(".experts.")[1].split(".")[0] for n, _ in model.hf_state_dict() if ".experts." in n})
        torch.save({"logits": logits, "experts": experts, "refused": refused}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_expert_parallel_2_ranks_equal_1(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    ref, cfg = make_ref(seed=9)
    single = ours_from(ref, cfg)
    ids = torch.randint(0, cfg["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        want = single(ids)
    torch.save((cfg, dict(single.hf_state_dict())), tmp_path / "state.pt")
    torch.save(ids, tmp_path / "ids.pt")
    # fork: the workers start in well under a second instead of re-importing torch (spawn)
    mp.start_processes(_ep_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path / "state.pt"),
                                         str(tmp_path / "ids.pt"), str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")  # fmt: skip
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert outs[0]["experts"] == ["0", "1", "2", "3"] and outs[1]["experts"] == ["4", "5", "6", "7"]
    for o in outs:  # every rank holds the full result after the all-reduce
        assert (o["logits"] - want).abs().max().item() <= LOGITS_TOL
        assert o["refused"]


def test_expert_parallel_size_must_divide_experts() -> None:
    class FakeGroup:
        pass

    import torch.distributed as dist

    cfg = ModelConfig.from_hf(moe_hf_config(num_experts=6))
    orig = dist.get_rank, dist.get_world_size
    dist.get_rank, dist.get_world_size = (lambda g=None: 0), (lambda g=None: 4)
    try:
        with pytest.raises(ConfigError, match="num_experts=6 is not divisible by the expert-parallel size 4"):
            Qwen2MoeForCausalLM(cfg, ep_group=FakeGroup())
    finally:
        dist.get_rank, dist.get_world_size = orig


# ---------------------------------------------------------------------------------- GGUF
def write_tiny_qwen2moe_gguf(path: Path, model: Qwen2MoeForCausalLM) -> dict[str, np.ndarray]:
    """`model` as a GGUF qwen2moe the way llama.cpp's converter lays it out: experts stacked
    (E, rows, cols) in Q8_0, the shared-expert gate 1-D; the rest F32. Returns the weights as
    the file holds them (HF names, dequantized)."""
    import gguf

    from qwenkit.loaders.gguf import hf_to_gguf_name

    cfg, moe = model.config, model.config.moe
    w = gguf.GGUFWriter(str(path), "qwen2moe")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(moe.num_experts)
    w.add_expert_used_count(moe.num_experts_per_tok)
    w.add_expert_feed_forward_length(moe.moe_intermediate_size)
    w.add_expert_shared_feed_forward_length(moe.shared_expert_intermediate_size)
    w.add_expert_weights_norm(moe.norm_topk_prob)
    q8 = gguf.GGMLQuantizationType.Q8_0
    ref: dict[str, np.ndarray] = {}
    experts: dict[tuple[str, str], list[np.ndarray]] = {}
    for name, t in model.hf_state_dict():
        arr = t.detach().float().numpy()
        if ".mlp.experts." in name:
            layer = name.split(".")[2]
            e, proj = name.split(".experts.")[1].split(".")[:2]
            experts.setdefault((layer, proj), []).append(arr)
            continue
        ref[name] = arr
        if name.endswith("shared_expert_gate.weight"):
            arr = arr.reshape(-1)  # llama.cpp: {n_embd}
        w.add_tensor(hf_to_gguf_name(name), arr)
    gguf_proj = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
    for (layer, proj), arrs in experts.items():
        q = gguf.quants.quantize(np.stack(arrs), q8)
        w.add_tensor(f"blk.{layer}.{gguf_proj[proj]}.weight", q, raw_shape=q.shape, raw_dtype=q8)
        for e, d in enumerate(gguf.quants.dequantize(q, q8)):
            ref[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = d
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def test_gguf_qwen2moe_loads_and_matches_transformers(tmp_path: Path) -> None:
    from qwenkit.loaders.gguf import GGUFFile

    # layers 0 and 2 stored with a dense FFN (llama.cpp writes none; the file decides here)
    ref, cfg = make_ref(seed=11, norm_topk_prob=True, mlp_only_layers=[0, 2], decoder_sparse_step=1)
    path = tmp_path / "tiny-moe.gguf"
    file_weights = write_tiny_qwen2moe_gguf(path, ours_from(ref, cfg))
    gf = GGUFFile.open(path)
    config = gf.config()
    assert config.moe is not None and config.moe.mlp_only_layers == (0, 2) and config.moe.norm_topk_prob
    assert [config.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    model = causal_lm_class(config)(config).eval()
    loaded = model.load_weights(gf.iter_weights(progress=False), adopt=True)
    assert loaded == {n for n, _ in model.named_parameters(remove_duplicate=False)}
    # the oracle: transformers holding the file's (dequantized) weights
    weights = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in file_weights.items()}
    ref.load_state_dict(hf_stacked_state(ref, weights))
    ids = torch.randint(0, cfg["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max().item() <= LOGITS_TOL


def hf_stacked_state(oracle, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert HF names -> transformers' in-memory state dict (stacked experts)."""
    state = {}
    for key, value in oracle.state_dict().items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key.removesuffix("gate_up_proj")
            state[key] = torch.stack([torch.cat([weights[f"{prefix}{e}.gate_proj.weight"], weights[f"{prefix}{e}.up_proj.weight"]])
                                      for e in range(value.shape[0])])  # fmt: skip
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key.removesuffix("down_proj")
            state[key] = torch.stack([weights[f"{prefix}{e}.down_proj.weight"] for e in range(value.shape[0])])
        else:
            state[key] = weights[key]
    return state
