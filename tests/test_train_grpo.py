"""GRPO: the loss against TRL's own `GRPOTrainer._compute_loss`, advantages, the chunked log-probs,
rewards in the sandbox, rollouts on the module being trained, and `qwenkit train grpo` end to end."""
from __future__ import annotations

import json
import textwrap
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qwenkit.cli.main import main
from qwenkit.train.grpo import (
    advantages,
    collate,
    per_token_loss,
    reduce_loss,
    sequence_logps,
)
from qwenkit.train.loss import token_logps


# ------------------------------------------------------------------ the loss vs TRL
def trl_loss(logps, inputs, *, loss_type, beta, eps_low, eps_high, max_len, is_ratio=None):
    """TRL 1.16's `GRPOTrainer._compute_loss`, run on a minimally built trainer whose model
    forward returns the given per-token log-probs."""
    from trl import GRPOTrainer

    t = object.__new__(GRPOTrainer)
    ident = lambda x, **k: x  # noqa: E731 (one process)
    attrs = dict(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, current_gradient_accumulation_steps=1, max_completion_length=max_len,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        accelerator=SimpleNamespace(gather=ident, reduce=ident, gather_for_metrics=ident, num_processes=1),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    for k, v in attrs.items():
        object.__setattr__(t, k, v)
    object.__setattr__(t, "model", SimpleNamespace(training=True))
    object.__setattr__(t, "_get_per_token_logps_and_entropies",
                       lambda *a, **k: (logps, torch.zeros_like(logps), None))
    inputs = dict(inputs)
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    return t._compute_loss(None, inputs), t._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("variant", ["plain", "kl_clip_high_old", "is_ratio"])
def test_loss_and_gradient_equal_trl(loss_type: str, variant: str) -> None:
    g = torch.Generator().manual_seed(1)
    B, P, C, L = 6, 3, 7, 9
    base = -torch.rand(B, C, generator=g, dtype=torch.float64) * 3
    mask = (torch.arange(C)[None] < torch.tensor([7, 5, 1, 6, 3, 7])[:, None]).to(torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    beta, eps_high = (0.04, 0.28) if variant == "kl_clip_high_old" else (0.0, 0.2)
    old = base + 0.3 * torch.randn(B, C, generator=g, dtype=torch.float64) if variant != "plain" else None
    ref = base + 0.2 * torch.randn(B, C, generator=g, dtype=torch.float64) if beta else None
    is_ratio = torch.rand(B, C, generator=g, dtype=torch.float64) * 2 if variant == "is_ratio" else None
    inputs = {"prompt_ids": torch.zeros(B, P, dtype=torch.long), "prompt_mask": torch.ones(B, P),
              "completion_ids": torch.zeros(B, C, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "num_items_in_batch": mask.sum()}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref

    theirs_lp = base.clone().requires_grad_(True)
    theirs, metrics = trl_loss(theirs_lp, inputs, loss_type=loss_type, beta=beta, eps_low=0.2, eps_high=eps_high,
                               max_len=L, is_ratio=is_ratio)
    theirs.backward()

    ours_lp = base.clone().requires_grad_(True)
    loss, extra = per_token_loss(ours_lp, old, ref, adv, beta=beta, epsilon_low=0.2, epsilon_high=eps_high,
                                 is_ratio=is_ratio)
    units = mask.sum() if loss_type == "dapo" else B  # what the trainer divides by
    ours = reduce_loss(loss, mask, loss_type, L) / units
    ours.backward()
    assert abs(float(ours.detach()) - float(theirs.detach())) <= 1e-6 * max(1.0, abs(float(theirs.detach())))
    torch.testing.assert_close(ours_lp.grad, theirs_lp.grad, rtol=1e-6, atol=1e-9)
    assert float(theirs.detach()) != 0.0 and float(ours_lp.grad.abs().sum()) > 0
    # metrics: token means over the batch, TRL's names
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if beta else ()):
        mine = float((extra[name] * mask).sum() / mask.sum())
        assert abs(mine - metrics[name][0]) < 1e-9, name
    if variant != "plain":
        assert metrics["clip_ratio/region_mean"][0] > 0  # the fixture does clip


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_the_definition(scale: str) -> None:
    """Independent numpy oracle: group mean-centred, divided by (sample std + 1e-4) of the group
    (TRL's Bessel-corrected nanstd) or of the batch, or not at all; weighted sum of functions."""
    rng = np.random.default_rng(0)
    G = 4
    table = rng.random((12, 2)).astype(np.float32)
    table[4:8, 0] = 0.5
    table[4:8, 1] = 0.25  # a group whose rewards are all equal
    w = np.array([1.0, 0.5], dtype=np.float32)
    adv, rewards, zero = advantages(torch.from_numpy(table), torch.from_numpy(w), G, scale)
    r = (table * w).sum(1)
    groups = r.reshape(-1, G)
    want = (groups - groups.mean(1, keepdims=True)).reshape(-1)
    if scale == "group":
        want = want / (np.repeat(groups.std(1, ddof=1), G) + 1e-4)
    elif scale == "batch":
        want = want / (r.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(adv.numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rewards.numpy(), r, rtol=1e-6)
    if scale != "batch":
        assert zero.tolist() == [False] * 4 + [True] * 4 + [False] * 4


def test_chunked_token_logps_equal_full_log_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    tgt = torch.randint(0, 50, (37,), generator=g)
    up = torch.randn(37, generator=g, dtype=torch.float64)
    ours = token_logps(h, w, tgt, chunk=8, temperature=0.7)
    (ours * up).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    full = ((h @ w.t()) / 0.7).log_softmax(-1).gather(1, tgt[:, None])[:, 0]
    (full * up).sum().backward()
    # the log-softmax runs in fp32 (as the LM loss does): fp32 rounding against the fp64 reference
    torch.testing.assert_close(ours.double(), full.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=0, atol=5e-6)
    torch.testing.assert_close(gw, w.grad, rtol=0, atol=5e-6)


# ------------------------------------------------------------------ rewards
CODE_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 5) == 5", "assert add(1, 1) == 3"]


def test_code_reward_fractions_and_timeout() -> None:
    import time

    from qwenkit.train.rewards import make_code_reward

    completions = [
        "```python\ndef add(a, b):\n    return a + b\n```",  # 3 of 4 (the last test is wrong)
        "```python\ndef add(a, b):\n    return 3 if a == 2 else a + b\n```",  # tests 0 and 2 pass
        "```python\ndef add(a, b):\n    return a - b\n```",
        "```python\ndef add(a, b):\n    while True:\n        pass\n```",
        "no code at all",
    ]
    fn = make_code_reward(timeout_s=1.0)
    t0 = time.perf_counter()
    out = fn(prompts=["p"] * 5, completions=completions, test_list=[CODE_TESTS] * 5)
    assert out == [0.75, 0.5, 0.0, 0.0, 0.0]
    assert time.perf_counter() - t0 < 20  # the infinite loop is cut at 1 s a test
    exact = fn(prompts=["p"], completions=[completions[0]], test_list=[CODE_TESTS[:3]])
    assert exact == [1.0]
    # rows without tests are skipped (None), as TRL's reward functions do
    assert fn(prompts=["p"], completions=["x"], other=[1]) == [None]


def test_code_reward_mbpp_plus_task_and_format_reward() -> None:
    from qwenkit.eval.mbpp import load_tasks
    from qwenkit.train.rewards import format_reward, make_code_reward

    task = load_tasks()["Mbpp/2"]
    right = f"```python\n{task['canonical_solution']}\n```"
    out = make_code_reward(timeout_s=2.0)(prompts=["p", "p"], completions=[right, "```python\ndef f(:\n```"],
                                          task_id=["Mbpp/2", "Mbpp/2"])
    assert out[0] in (pytest.approx(1.0), pytest.approx(2 / 3), pytest.approx(1 / 3))  # set order may vary
    assert out[0] > 0 and out[1] == 0.0
    conv = [[{"role": "assistant", "content": "```python\nx = 1\n```"}], "plain", "```python\ndef (\n```"]
    assert format_reward(prompts=[[], "p", "p"], completions=conv) == [1.0, 0.0, 0.0]


def test_user_reward_function_by_module_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qwenkit.train.rewards import RewardError, load_reward_func, score

    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def by_answer(prompts, completions, answer, **kwargs):
            return [float(c == a) if a is not None else None for c, a in zip(completions, answer)]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    name, fn = load_reward_func("my_rewards:by_answer")
    assert name == "by_answer"
    table = score([(name, fn)], ["q"] * 3, ["4", "5", "4"], [[1], [2], [3]], {"answer": ["4", "4", None]})
    assert table[0] == [1.0] and table[1] == [0.0] and np.isnan(table[2][0])
    with pytest.raises(RewardError, match="no_such_module"):
        load_reward_func("no_such_module:f")


# ------------------------------------------------------------------ rollouts on the trained module
def test_rollouts_sample_from_the_module_being_trained(tiny_hf_dir: Path) -> None:
    from qwenkit import cpu
    from qwenkit.loaders.load import load
    from qwenkit.train.rollout import Rollouts

    lm = load(tiny_hf_dir, dtype=torch.float32, quantization="none", progress=False)
    model = cpu.uninstall(lm.model).train()
    with torch.no_grad():
        model.lm_head.weight.mul_(0.05)  # a random tiny model is near-deterministic: spread its sampling
    classes = {n: type(m) for n, m in model.named_modules()}
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    prompt = lm.tokenizer.encode("hello world, this is a prompt long enough for a block " * 2)
    r = Rollouts(model, lm.tokenizer, num_generations=3, max_completion_length=6, seed=0)
    a = r.generate([prompt])
    assert model.training and len(a.completion_ids) == 3
    assert {n: type(m) for n, m in model.named_modules()} == classes  # no fused CPU modules swapped in
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs  # no copies
    assert r.engine.block_manager.num_cached_blocks > 0

    def check_logps(batch) -> None:  # the engine's log-probs are the trained module's
        for p, c, lp in zip(batch.prompt_ids, batch.completion_ids, batch.sampling_logps):
            b = collate([p], [c], torch.zeros(1), "grpo", 1.0)
            with torch.no_grad():
                ours = sequence_logps(model, b, chunk=64, temperature=1.0)[0]
            torch.testing.assert_close(ours, torch.tensor(lp), rtol=1e-4, atol=1e-4)

    check_logps(a)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # tied: the embeddings change too
    r.refresh()
    assert r.engine.block_manager.num_cached_blocks == 0  # stale KV dropped
    r.generator.manual_seed(0)
    b = r.generate([prompt])
    check_logps(b)
    assert a.sampling_logps != b.sampling_logps
    assert len({tuple(c) for c in a.completion_ids}) > 1  # G different samples


# ------------------------------------------------------------------ end to end
def toy_reward_module(tmp_path: Path) -> str:
    (tmp_path / "toy_reward.py").write_text(textwrap.dedent("""
        import itertools
        _n = itertools.count()  # a tiny random model's samples may all be alike: vary the rewards anyway

        def length_reward(prompts, completions, completion_ids, **kwargs):
            return [len(ids) / 10.0 + (next(_n) % 3) / 4 for ids in completion_ids]
    """))
    return "toy_reward:length_reward"


@pytest.mark.parametrize("extra", [
    ["loss_type=grpo"],
    ["loss_type=dapo", "beta=0.04", "num_iterations=2", "epsilon_high=0.28", "order_by_reward_variance=true"],
    ["loss_type=dr_grpo", "rollout_quantization=int8"],
    ["lora=true", "precision=bf16", "beta=0.04", "order_by_reward_variance=true"],  # bf16 frozen base: rollouts and reference under autocast
])
def test_train_grpo_cli_end_to_end(tiny_hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   extra: list[str]) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    func = toy_reward_module(tmp_path)
    data = tmp_path / "prompts.jsonl"
    with open(data, "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"Count to {i}:"}) + "\n")
        f.write(json.dumps({"prompt": [{"role": "user", "content": "Say hi"}]}) + "\n")
    out = tmp_path / "run"
    args = ["train", "grpo", str(tiny_hf_dir), "--data", str(data), "--out", str(out), "--max-steps", "2",
            "--num-generations", "2", "batch_size=4", "micro_batch_size=2", "max_completion_length=6",
            "max_prompt_length=32", "lr=1e-3", "min_lr=1e-4", "warmup_steps=0",
            f"reward_funcs={func}", "progress=false", "tensorboard=false", "--quiet-summary", *extra]
    if not any(e.startswith("precision=") for e in extra):
        args.append("precision=fp32")
    assert main(args) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for name in ("reward", "reward_std", "frac_reward_zero_std", "clip_ratio/region_mean", "completions/mean_length",
                 "rollout_tokens_per_s", "time/rollout_s", "time/reward_s", "time/train_s",
                 "rewards/length_reward/mean"):
        assert name in steps[0], name
    if "beta=0.04" in extra:
        assert "kl" in steps[0] and steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    if "rollout_quantization=int8" in extra:
        assert "time/requantize_s" in steps[0] and "sampling/importance_sampling_ratio/mean" in steps[0]
    ckpt = out / "checkpoint-000002"
    assert (ckpt / ("adapter_model.safetensors" if "lora=true" in extra else "model.safetensors")).is_file()
    assert json.loads((ckpt / "train_config.json").read_text())["num_generations"] == 2
