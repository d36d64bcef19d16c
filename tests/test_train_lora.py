"""LoRA: peft on our fused model (`qwenkit.train.lora`), peft's file format, and the merges
(`merge_lora` through peft, `qwenkit.loaders.lora` without it) checked against peft on a
transformers Qwen2."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from qwenkit.errors import AdapterError  # noqa: E402
from qwenkit.model.layers import MergedLinear  # noqa: E402
from tests.tiny import make_hf_and_ours  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA = 4, 8


def randomize_adapters(peft_model: Any, seed: int = 1) -> None:
    """peft starts B at zero (the adapter is a no-op); random A and B make every shard count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def peft_reference(ref: nn.Module, adapter_dir: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(ref, str(adapter_dir)).eval()


def assert_fused(model: nn.Module) -> None:
    names = [n for n, _ in model.named_modules()]
    assert not any("lora" in n or "base_layer" in n for n in names), names
    for layer in model.model.layers:
        assert type(layer.self_attn.qkv_proj) is MergedLinear
        assert type(layer.mlp.gate_up_proj) is MergedLinear
        assert type(layer.self_attn.o_proj) is nn.Linear and type(layer.mlp.down_proj) is nn.Linear


@pytest.fixture()
def lora_setup(tmp_path: Path) -> dict[str, Any]:
    """Our model under peft with random adapters, those adapters saved, and peft's reference."""
    from qwenkit.train.lora import prepare_lora, save_adapter

    ref, ours = make_hf_and_ours(seed=3)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = ref(ids).logits
    pm = prepare_lora(ours, r=R, alpha=ALPHA, targets=TARGETS)
    randomize_adapters(pm)
    adapter_dir = save_adapter(pm, tmp_path / "adapter", base_model_name_or_path="tiny-qwen2")
    theirs = peft_reference(ref, adapter_dir)
    with torch.no_grad():
        want = theirs(ids).logits
    assert (want - base_logits).abs().max() > 1e-3  # the adapters change the output
    return {"pm": pm, "ids": ids, "want": want, "adapter_dir": adapter_dir, "tmp": tmp_path}


def test_adapter_logits_match_peft_on_transformers(lora_setup: dict[str, Any]) -> None:
    pm, ids, want = lora_setup["pm"], lora_setup["ids"], lora_setup["want"]
    pm.eval()
    with torch.no_grad():
        got = pm(ids)
    assert (got - want).abs().max().item() <= 1e-5


def test_saved_adapter_format(lora_setup: dict[str, Any]) -> None:
    from safetensors import safe_open

    d = lora_setup["adapter_dir"]
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == R and cfg["lora_alpha"] == ALPHA
    assert cfg["base_model_name_or_path"] == "tiny-qwen2" and sorted(cfg["target_modules"]) == sorted(TARGETS)
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.3.mlp.up_proj.lora_B.weight" in keys
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in keys)
    assert len(keys) == 4 * len(TARGETS) * 2  # 4 layers, 7 projections, A and B


def test_zero_init_adapters_give_base_logits() -> None:
    from qwenkit.train.lora import prepare_lora

    _, ours = make_hf_and_ours(seed=4)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        base = ours(ids)
        pm = prepare_lora(ours, r=R, alpha=ALPHA)
        got = pm(ids)
        with pm.disable_adapter():  # the same unfused modules without the adapters
            assert torch.equal(got, pm(ids))
    assert (got - base).abs().max().item() <= 1e-6  # unfused GEMMs vs the fused one


def test_only_adapters_train_and_all_get_gradients() -> None:
    from qwenkit.train.lora import prepare_lora

    _, ours = make_hf_and_ours(seed=5)
    pm = prepare_lora(ours, r=R, alpha=ALPHA, dropout=0.1)
    randomize_adapters(pm)  # B = 0 would leave A without a gradient
    pm.train()
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    ids = torch.randint(0, 256, (2, 10))
    logits = pm(ids)
    nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    for proj in TARGETS:  # every projection (each q/k/v and gate/up shard) has its own adapter
        for half in ("lora_A", "lora_B"):
            assert sum(f".{proj}.{half}." in n for n in trainable) == 4, (proj, half)


def test_merge_lora_matches_peft_and_refuses(lora_setup: dict[str, Any]) -> None:
    from qwenkit.model import Qwen2ForCausalLM
    from qwenkit.train.lora import merge_lora

    merged = merge_lora(lora_setup["pm"]).eval()
    assert type(merged) is Qwen2ForCausalLM
    assert_fused(merged)
    assert all(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        got = merged(lora_setup["ids"])
    assert (got - lora_setup["want"]).abs().max().item() <= 1e-5


def test_merged_model_gets_the_fused_decode_step_back() -> None:
    """LoRA on a CPU-installed model runs the plain modules; merged and quantized, the one-call
    decode step applies again."""
    from qwenkit import cpu
    from qwenkit.cpu import build, decode_step
    from qwenkit.quant import quantize_model
    from qwenkit.train.lora import merge_lora, prepare_lora

    if build.lib() is None:
        pytest.skip("needs the C kernels (gcc, AVX2)")
    tiny = dict(hidden_size=256, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2)
    _, ours = make_hf_and_ours(seed=8, **tiny)
    assert decode_step.plan_for(cpu.install(quantize_model(make_hf_and_ours(seed=8, **tiny)[1], "int8")).model)
    pm = prepare_lora(cpu.install(ours), r=R, alpha=ALPHA)
    assert decode_step.plan_for(pm.get_base_model().model) is None
    merged = cpu.install(quantize_model(merge_lora(pm), "int8"))
    assert decode_step.plan_for(merged.model) is not None


def test_loader_merge_matches_peft(lora_setup: dict[str, Any]) -> None:
    from qwenkit.loaders.lora import merge_adapter_into, read_adapter

    _, ours = make_hf_and_ours(seed=3)  # the same base weights, fresh
    adapter = read_adapter(lora_setup["adapter_dir"])
    assert (adapter.r, adapter.alpha, adapter.use_rslora, adapter.scale) == (R, ALPHA, False, ALPHA / R)
    assert merge_adapter_into(ours, adapter) == 4 * len(TARGETS)
    assert_fused(ours)
    with torch.no_grad():
        got = ours(lora_setup["ids"])
    assert (got - lora_setup["want"]).abs().max().item() <= 1e-5


def test_rslora_scale_matches_peft(tmp_path: Path) -> None:
    from qwenkit.loaders.lora import merge_adapter_into, read_adapter
    from qwenkit.train.lora import prepare_lora, save_adapter

    ref, ours = make_hf_and_ours(seed=6)
    pm = prepare_lora(ours, r=R, alpha=ALPHA, targets=("q_proj", "v_proj", "down_proj"), use_rslora=True)
    randomize_adapters(pm)
    save_adapter(pm, tmp_path)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        want = peft_reference(ref, tmp_path)(ids).logits
        assert (pm.eval()(ids) - want).abs().max().item() <= 1e-5
    adapter = read_adapter(tmp_path)
    assert adapter.use_rslora and adapter.scale == pytest.approx(ALPHA / R**0.5)
    _, fresh = make_hf_and_ours(seed=6)
    merge_adapter_into(fresh, adapter)
    with torch.no_grad():
        assert (fresh(ids) - want).abs().max().item() <= 1e-5


def _tiny_hf_with_adapter(tiny_hf_dir: Path, out: Path) -> tuple[Path, torch.Tensor]:
    """An adapter trained on the tiny HF folder's model; returns it and a test prompt."""
    from qwenkit.loaders.load import load
    from qwenkit.train.lora import prepare_lora, save_adapter

    lm = load(tiny_hf_dir, progress=False)
    pm = prepare_lora(lm.model, r=R, alpha=ALPHA)
    randomize_adapters(pm, seed=7)
    ids = torch.randint(0, lm.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    return save_adapter(pm, out, base_model_name_or_path=str(tiny_hf_dir)), ids


def test_train_merge_writes_a_loadable_hf_folder(tiny_hf_dir: Path, tmp_path: Path) -> None:
    import transformers

    from qwenkit.loaders.load import load
    from qwenkit.train.merge import add_merge_parser

    adapter_dir, ids = _tiny_hf_with_adapter(tiny_hf_dir, tmp_path / "adapter")
    parser = argparse.ArgumentParser(prog="qwenkit train")
    add_merge_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "merged"
    args = parser.parse_args(["merge", str(tiny_hf_dir), "--adapter", str(adapter_dir), "--out", str(out)])
    assert args.func(args) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()

    merged = load(out, progress=False)
    assert_fused(merged.model)
    base_ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    want = peft_reference(base_ref, adapter_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ours = merged.model(ids)
        tol = 2e-6 * ours.abs().max().item()  # two implementations, logits up to ~15
        assert (hf(ids).logits - ours).abs().max().item() <= tol
        assert (want(ids).logits - ours).abs().max().item() <= tol
        # and the same as merging at load time
        assert torch.equal(load(tiny_hf_dir, progress=False, lora=adapter_dir).model(ids), ours)


def test_load_with_lora_then_int8(tiny_hf_dir: Path, tmp_path: Path) -> None:
    from qwenkit.loaders.load import load
    from qwenkit.quant.linear import QuantizedLinear

    adapter_dir, ids = _tiny_hf_with_adapter(tiny_hf_dir, tmp_path / "adapter")
    fp32 = load(tiny_hf_dir, progress=False, lora=adapter_dir).model
    base = load(tiny_hf_dir, progress=False).model
    q = load(tiny_hf_dir, progress=False, lora=adapter_dir, quantization="int8").model
    assert isinstance(q.model.layers[0].self_attn.qkv_proj, QuantizedLinear)
    with torch.no_grad():
        want, got, plain = fp32(ids), q(ids), base(ids)
    err = (got - want).abs().max().item()
    assert err < 0.05 * want.abs().max().item()
    assert err < (plain - want).abs().max().item()  # int8 of the merged weights, not of the base


def _write_adapter(d: Path, config: dict[str, Any] | None, tensors: dict[str, torch.Tensor] | None) -> Path:
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (d / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


GOOD_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def good_tensors() -> dict[str, torch.Tensor]:
    return {f"{Q}.lora_A.weight": torch.zeros(2, 64), f"{Q}.lora_B.weight": torch.zeros(64, 2)}


@pytest.mark.parametrize(
    "config, tensors, message",
    [
        (None, good_tensors(), "no adapter_config.json"),
        ({**GOOD_CONFIG, "r": 0}, good_tensors(), "'r' must be a positive integer"),
        ({**GOOD_CONFIG, "lora_alpha": "x"}, good_tensors(), "'lora_alpha'"),
        ({**GOOD_CONFIG, "use_rslora": "yes"}, good_tensors(), "'use_rslora'"),
        ({**GOOD_CONFIG, "target_modules": []}, good_tensors(), "'target_modules'"),
        ({**GOOD_CONFIG, "use_dora": True}, good_tensors(), "'use_dora'"),
        ({**GOOD_CONFIG, "peft_type": "IA3"}, good_tensors(), "'peft_type'"),
        (GOOD_CONFIG, None, "no adapter_model.safetensors"),
        (GOOD_CONFIG, {f"{Q}.lora_A.weight": torch.zeros(2, 64)}, f"{Q}.lora_B.weight is missing"),
        (GOOD_CONFIG, {**good_tensors(), f"{Q}.lora_A.weight": torch.zeros(3, 64)}, "not rank r=2"),
        (GOOD_CONFIG, {**good_tensors(), "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight":
                       torch.zeros(2, 64)}, "not in target_modules"),  # fmt: skip
        (GOOD_CONFIG, {**good_tensors(), f"{Q}.lora_magnitude_vector": torch.zeros(64)}, "unsupported tensor"),
    ],
)
def test_malformed_adapter_is_a_clear_error(tmp_path: Path, config: Any, tensors: Any, message: str) -> None:
    from qwenkit.loaders.lora import read_adapter

    d = _write_adapter(tmp_path / "bad", config, tensors)
    with pytest.raises(AdapterError, match="bad") as e:  # names the folder or file
        read_adapter(d)
    assert message in str(e.value)


def test_corrupt_files_are_clear_errors(tmp_path: Path) -> None:
    from qwenkit.loaders.lora import read_adapter

    d = _write_adapter(tmp_path / "a", GOOD_CONFIG, good_tensors())
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(AdapterError, match="adapter_model.safetensors: unreadable"):
        read_adapter(d)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json: unreadable"):
        read_adapter(d)
    with pytest.raises(AdapterError, match="not found"):
        read_adapter(tmp_path / "missing")


def test_adapter_for_another_model_is_a_clear_error(tmp_path: Path) -> None:
    from qwenkit.loaders.lora import merge_adapter_into, read_adapter

    d = _write_adapter(tmp_path / "a", GOOD_CONFIG, {f"{Q}.lora_A.weight": torch.zeros(2, 32),
                                                     f"{Q}.lora_B.weight": torch.zeros(64, 2)})  # fmt: skip
    _, ours = make_hf_and_ours(seed=0)
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: .*q_proj.*shape"):
        merge_adapter_into(ours, read_adapter(d))
    d = _write_adapter(tmp_path / "b", GOOD_CONFIG, {
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
        "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)})  # fmt: skip
    with pytest.raises(AdapterError, match="no module 'model.layers.9.self_attn.q_proj'"):
        merge_adapter_into(ours, read_adapter(d))


def test_serve_and_generate_accept_lora() -> None:
    from qwenkit.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "m", "--lora", "/a"])
    assert args.lora == "/a"
    assert parser.parse_args(["generate", "hi", "--lora", "/b"]).lora == "/b"
    assert parser.parse_args(["chat"]).lora is None


@pytest.mark.slow
def test_real_05b_lora_matches_peft(gguf_05b_path: Path, tmp_path: Path) -> None:
    """The real model: our LoRA forward and the loader merge agree with peft on transformers."""
    import transformers

    from qwenkit.loaders.hf import export_hf
    from qwenkit.loaders.load import load
    from qwenkit.train.lora import prepare_lora, save_adapter

    lm = load(gguf_05b_path, progress=False)
    hf_dir = export_hf(lm.model, tmp_path / "hf", tokenizer=lm.tokenizer)
    ids = torch.tensor([lm.tokenizer.encode("def fib(n):\n    return")])
    pm = prepare_lora(lm.model, r=8, alpha=16)
    randomize_adapters(pm)
    adapter_dir = save_adapter(pm, tmp_path / "adapter", base_model_name_or_path=str(hf_dir))
    with torch.no_grad():
        ours = pm.eval()(ids)
    del pm, lm
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = peft_reference(ref, adapter_dir)(ids).logits
    del ref
    tol = 1e-4 * want.abs().max().item()
    assert (ours - want).abs().max().item() <= tol
    merged = load(hf_dir, progress=False, lora=adapter_dir).model
    with torch.no_grad():
        assert (merged(ids) - want).abs().max().item() <= tol
