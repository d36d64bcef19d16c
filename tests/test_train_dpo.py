"""DPO: golden loss values, TRL 1.16's DPOTrainer loss code as the oracle (on given log-probs and
through a tiny random transformers Qwen2 with our model holding the same weights), TRL's
tokenization, the three reference sources, the CLI end to end, learning, bad data."""
from __future__ import annotations

import copy
import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from qwenkit.errors import DataError
from qwenkit.train.distributed import DistInfo
from qwenkit.train.dpo import DPOObjective, dpo_loss, precompute_reference
from qwenkit.train.preference import PairLoader, PreferenceExample, collate_pairs, tokenize_preferences

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def sp(x: float) -> float:  # -logsigmoid(x) = softplus(-x)
    return math.log1p(math.exp(-x))


# ---------------------------------------------------------------------------- golden values
def test_golden_losses() -> None:
    """Pair 1: logps chosen -5 / rejected -7, reference -6 / -6, 4 and 2 completion tokens:
    log-ratios +1 / -1, delta 2; pair 2: everything equal (delta 0)."""
    args = [torch.tensor(v) for v in ([-5.0, -3.0], [-7.0, -3.0], [-6.0, -3.0], [-6.0, -3.0])]
    lengths = dict(chosen_lengths=torch.tensor([4.0, 1.0]), rejected_lengths=torch.tensor([2.0, 1.0]))
    beta = 0.1
    want = {
        "sigmoid": [sp(0.2), math.log(2)],
        # per-token log-ratios 1/4 and -1/2: (0.75 - 1 / 0.2)^2; pair 2: (0 - 5)^2
        "ipo": [(0.75 - 5.0) ** 2, 25.0],
        # ((1 - 0.1) sp(0.2) - 0.1 sp(-0.2)) / 0.8; at delta 0: (0.9 - 0.1) log 2 / 0.8 = log 2
        "robust": [(0.9 * sp(0.2) - 0.1 * sp(-0.2)) / 0.8, math.log(2)],
    }
    for loss_type, expected in want.items():
        losses, stats = dpo_loss(*args, beta=beta, loss_type=loss_type, label_smoothing=0.1, **lengths)
        assert losses.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7), loss_type
    _, stats = dpo_loss(*args, beta=beta)
    assert stats["rewards/chosen"].tolist() == pytest.approx([0.1, 0.0])
    assert stats["rewards/rejected"].tolist() == pytest.approx([-0.1, 0.0])
    assert stats["rewards/margins"].tolist() == pytest.approx([0.2, 0.0])
    assert stats["rewards/accuracies"].tolist() == [1.0, 0.0]  # a tie is not a win (TRL: >)
    assert stats["logps/chosen"].tolist() == [-5.0, -3.0]
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*args, beta=beta, loss_type="hinge")


# ---------------------------------------------------------------------------- TRL's loss code
def trl_trainer(model: Any, *, loss_type: str, beta: float, label_smoothing: float = 0.0,
                ref_model: Any = None, precompute: bool = False) -> SimpleNamespace:  # fmt: skip
    """The attributes DPOTrainer._compute_loss reads (a minimally constructed trainer)."""
    acc = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x,
                          unwrap_model=lambda m: m)  # fmt: skip
    return SimpleNamespace(
        model=model, ref_model=ref_model, accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=precompute, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )  # fmt: skip


def trl_compute_loss(trainer: SimpleNamespace, model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    from trl import DPOTrainer

    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


class FixedLogps(torch.nn.Module):
    """A 'model' whose fused-head forward returns given per-token log-probs (TRL's output fields)."""

    def __init__(self, per_token: torch.Tensor) -> None:
        super().__init__()
        self.per_token = per_token

    def forward(self, **kw: Any) -> SimpleNamespace:
        z = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=z, mean_logits=z, is_top1=z.bool())


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust"])
def test_loss_equals_trl_on_logps(loss_type: str) -> None:
    torch.manual_seed(0)
    b, t = 5, 9
    mask = torch.zeros(2 * b, t, dtype=torch.long)
    for r in range(2 * b):  # prompts of 2..4 tokens, completions of 1..(t - prompt)
        p = 2 + r % 3
        mask[r, p : p + 1 + (r * 7) % (t - p)] = 1
    per_token = torch.randn(2 * b, t - 1) * 2 * mask[:, 1:]
    ref_c, ref_r = torch.randn(b) * 3, torch.randn(b) * 3
    inputs = {"input_ids": torch.zeros(2 * b, t, dtype=torch.long), "attention_mask": torch.ones(2 * b, t),
              "completion_mask": mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}  # fmt: skip
    model = FixedLogps(per_token).train()
    tr = trl_trainer(model, loss_type=loss_type, beta=0.3, label_smoothing=0.2, precompute=True)
    want, metrics = trl_compute_loss(tr, model, inputs)
    c, r = per_token.sum(1).chunk(2)
    lc, lr = mask.sum(1).float().chunk(2)
    losses, stats = dpo_loss(c, r, ref_c, ref_r, beta=0.3, loss_type=loss_type, label_smoothing=0.2,
                             chosen_lengths=lc, rejected_lengths=lr)  # fmt: skip
    assert float(losses.mean()) == pytest.approx(float(want), rel=1e-6)
    for k, v in stats.items():
        assert float(v.mean()) == pytest.approx(metrics[k], rel=1e-6, abs=1e-7), k


# ---------------------------------------------------------------------------- the full path
def random_pairs(vocab: int, n: int, seed: int = 0) -> list[PreferenceExample]:
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(2, vocab, (k,), generator=g).tolist()

    out = []
    for i in range(n):
        prompt = ids(3 + i % 4)
        c, r = ids(2 + (i * 3) % 5), ids(1 + (i * 5) % 6)
        out.append(PreferenceExample(prompt + c, len(prompt), prompt + r, len(prompt)))
    return out


def trl_inputs(pairs: list[PreferenceExample]) -> dict[str, torch.Tensor]:
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = [{"prompt_ids": p.chosen_ids[: p.chosen_prompt_len], "chosen_ids": p.chosen_ids[p.chosen_prompt_len:],
                 "rejected_ids": p.rejected_ids[p.rejected_prompt_len:]} for p in pairs]  # fmt: skip
    return DataCollatorForPreference(pad_token_id=0)(examples)


def hf_pair(seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """(HF policy, HF reference, our policy, our reference): the reference is the policy perturbed."""
    from tests.tiny import make_hf_and_ours

    hf, ours = make_hf_and_ours(seed)
    hf_ref = copy.deepcopy(hf)
    with torch.no_grad():
        for p in hf_ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours_ref = copy.deepcopy(ours)
    ours_ref.load_weights(hf_ref.state_dict().items())
    return hf.train(), hf_ref.eval(), ours.train(), ours_ref.eval().requires_grad_(False)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust"])
def test_full_path_equals_trl(loss_type: str) -> None:
    """TRL's _compute_loss on a transformers Qwen2 (+ its frozen reference) vs our objective on our
    model with the same weights: loss, every metric and the LM head / embedding gradients."""
    from trl.trainer.utils import add_fused_lm_head

    hf, hf_ref, ours, ours_ref = hf_pair()
    add_fused_lm_head(hf, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(hf_ref)
    pairs = random_pairs(hf.config.vocab_size, 6)
    tr = trl_trainer(hf, loss_type=loss_type, beta=0.5, label_smoothing=0.1, ref_model=hf_ref)
    want, metrics = trl_compute_loss(tr, hf, trl_inputs(pairs))
    want.backward()

    obj = DPOObjective(ours, beta=0.5, loss_type=loss_type, label_smoothing=0.1, chunk=7, ref_model=ours_ref)
    batch = collate_pairs(pairs)
    loss_sum, stats = obj(batch)
    (loss_sum / batch.num_units).backward()
    assert float(loss_sum.detach()) / 6 == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    assert float(stats["rewards/margins"]) != 0.0
    for k, v in stats.items():
        assert float(v) / 6 == pytest.approx(metrics[k], rel=1e-5, abs=1e-5), k
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight",
                 "model.layers.0.mlp.down_proj.weight"):  # fmt: skip
        g_hf = hf.get_parameter(name).grad
        g_ours = ours.get_parameter(name).grad
        assert (g_ours - g_hf).abs().max() <= 1e-5 * g_hf.abs().max() + 1e-8, name


def test_reference_sources_agree() -> None:
    """Adapters disabled (LoRA) == a separate frozen copy of the base; precomputed == on the fly."""
    from qwenkit.train.lora import prepare_lora
    from tests.tiny import make_hf_and_ours

    _, base = make_hf_and_ours(1)
    frozen = copy.deepcopy(base).eval().requires_grad_(False)
    peft_model = prepare_lora(base, r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
    model = peft_model.get_base_model()
    with torch.no_grad():  # a non-zero adapter, so that the policy differs from its reference
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pairs = random_pairs(256, 5, seed=2)
    batch = collate_pairs(pairs)
    lora_obj = DPOObjective(model, beta=0.1, peft_model=peft_model)
    copy_obj = DPOObjective(model, beta=0.1, ref_model=frozen)
    a, b = lora_obj.reference_logps(batch), copy_obj.reference_logps(batch)
    torch.testing.assert_close(torch.cat(a), torch.cat(b), rtol=1e-5, atol=1e-5)
    policy = torch.cat(lora_obj.logps(model, batch).chunk(2))
    assert (policy - torch.cat(a)).abs().max() > 1e-3  # the adapter matters, and was re-enabled

    loss_fly, stats_fly = copy_obj(batch)
    precompute_reference(copy_obj, pairs, CPU, batch_pairs=2)
    pre_batch = collate_pairs(pairs)
    assert pre_batch.ref_chosen_logps is not None
    no_ref = DPOObjective(model, beta=0.1)  # no reference model: must use the batch's log-probs
    loss_pre, stats_pre = no_ref(pre_batch)
    torch.testing.assert_close(loss_pre, loss_fly, rtol=1e-5, atol=1e-6)
    for k in stats_fly:
        torch.testing.assert_close(stats_pre[k], stats_fly[k], rtol=1e-5, atol=1e-5)


def test_chunked_logps_gradient_and_empty_pairs() -> None:
    """Chunking does not change values or gradients; an empty padding pair adds nothing."""
    from tests.tiny import make_hf_and_ours

    _, ours = make_hf_and_ours(3)
    pairs = random_pairs(256, 3, seed=4)
    ref = copy.deepcopy(ours).requires_grad_(False)
    grads = []
    for chunk, padded in ((1000, False), (3, True)):
        ours.zero_grad()
        obj = DPOObjective(ours, beta=0.2, chunk=chunk, ref_model=ref)
        batch = collate_pairs(pairs + [None] if padded else pairs)
        assert batch.num_units == 3
        loss, _ = obj(batch)
        loss.backward()
        grads.append((float(loss.detach()), ours.lm_head.weight.grad.clone(), ours.model.embed_tokens.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for a, b in zip(grads[0][1:], grads[1][1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- tokenization
PREFS = [
    {"prompt": [{"role": "user", "content": "What color is the sky?"}],
     "chosen": [{"role": "assistant", "content": "It is blue."}],
     "rejected": [{"role": "assistant", "content": "It is green."}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
     "chosen": [{"role": "assistant", "content": "6"}], "rejected": [{"role": "assistant", "content": "seven"}]},
    {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Berlin."},
    {"prompt": "def add(a, b):", "chosen": "\n    return a + b", "rejected": "\n    return a - b<|im_end|>"},
]  # fmt: skip


def trl_tokenized(tokenizer_dir: Path, examples: list[dict[str, Any]], max_length: int | None) -> list[Any]:
    """TRL's DPOTrainer dataset preparation + its collator's truncation, per example."""
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    datasets.disable_progress_bars()
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    out = []
    for ex in examples:
        ds = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=hf), datasets.Dataset.from_list([ex]), hf, args, "t")
        if not len(ds):
            out.append(None)
            continue
        row = {k: ds[0][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        batch = DataCollatorForPreference(pad_token_id=-1, max_length=max_length)([row])
        rows = []
        for i in range(2):
            keep = batch["attention_mask"][i].bool()
            rows.append((batch["input_ids"][i][keep].tolist(), batch["completion_mask"][i][keep].tolist()))
        out.append(rows)
    return out


@pytest.mark.parametrize("max_length", [None, 18, 54])  # 18, 54: rows cut and pairs dropped
def test_tokenization_equals_trl(qwen_tokenizer_dir: Path, max_length: int | None) -> None:
    from qwenkit.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_dir(qwen_tokenizer_dir)
    expected = trl_tokenized(qwen_tokenizer_dir, PREFS, max_length)
    for ex, want in zip(PREFS, expected):
        try:
            got, stats = tokenize_preferences([ex], tok, max_length=max_length or 10**6)
        except DataError:
            assert want is None, ex
            continue
        assert want is not None, ex
        p = got[0]
        rows = [(p.chosen_ids, p.chosen_prompt_len), (p.rejected_ids, p.rejected_prompt_len)]
        assert [(ids, [0] * n + [1] * (len(ids) - n)) for ids, n in rows] == want, ex
    # the messages-as-prompt form is the prompt form
    a = tokenize_preferences([{**PREFS[0], "messages": PREFS[0]["prompt"]}], tok, max_length=99)[0]
    m = dict(PREFS[0])
    m["messages"] = m.pop("prompt")
    assert tokenize_preferences([m], tok, max_length=99)[0] == a


def test_bad_data_names_the_line(tiny_tokenizer: Any, tmp_path: Path) -> None:
    from qwenkit.data.readers import read_records

    path = tmp_path / "prefs.jsonl"
    good = json.dumps(PREFS[3])
    path.write_text(good + "\n" + good + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(DataError, match=r"prefs\.jsonl line 3: .*'chosen' and 'rejected'"):
        tokenize_preferences(read_records(path, check=False), tiny_tokenizer, max_length=64)
    path.write_text(good + "\n" + json.dumps({"prompt": "x", "chosen": [{"role": "assistant", "content": "y"}],
                                              "rejected": "z"}) + "\n")  # fmt: skip
    with pytest.raises(DataError, match=r"prefs\.jsonl line 2: .*all be strings"):
        tokenize_preferences(read_records(path, check=False), tiny_tokenizer, max_length=64)


def test_pair_loader_layout_and_resume() -> None:
    pairs = random_pairs(256, 11)
    one = PairLoader(pairs, batch_size=4, seed=5)
    assert one.steps_per_epoch == 3
    steps = [mb for _, mb in zip(range(5), one)]
    # every pair once an epoch; micro-batching / ranks only regroup a step's pairs
    first_epoch = [int(x) for s in steps[:3] for b in s for x in b.input_ids[:, 0][: b.num_pairs]]
    assert sorted(first_epoch) == sorted(p.chosen_ids[0] for p in pairs)
    two = [PairLoader(pairs, batch_size=4, seed=5, micro_batch_size=1, rank=r, world_size=2) for r in range(2)]
    for step, mbs in zip(steps, zip(*[iter(t) for t in two])):
        units = sum(b.num_units for rank in mbs for b in rank)
        assert units == sum(b.num_units for b in step)
        assert len(mbs[0]) == len(mbs[1])
    resumed = PairLoader(pairs, batch_size=4, seed=5)
    resumed.load_state_dict(PairLoader(pairs, batch_size=4, seed=5).state_dict() | {"step_in_epoch": 2})
    nxt = next(iter(resumed))
    assert torch.equal(nxt[0].input_ids, steps[2][0].input_ids)


# ---------------------------------------------------------------------------- end to end
def write_prefs(path: Path, n: int = 12, parity: bool = True) -> Path:
    """Parity questions answered right (chosen) and wrong; without `parity` the chosen answer is
    always "yes" (a preference a tiny model learns in a few steps)."""
    with open(path, "w") as f:
        for i in range(n):
            good = "yes" if i % 2 == 0 or not parity else "no"
            bad = "no" if good == "yes" else "yes"
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"Is {i} even?"}],
                                "chosen": [{"role": "assistant", "content": good}],
                                "rejected": [{"role": "assistant", "content": bad}]}) + "\n")
    return path


def dpo_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "dpo", str(model), "--data", str(data), "--out", str(out), "max_length=256", "batch_size=4",
            "micro_batch_size=2", "lr=5e-3", "min_lr=5e-4", "warmup_steps=0", "progress=false", "tensorboard=false",
            "precision=fp32", "--quiet-summary", *extra]  # fmt: skip


@pytest.mark.parametrize("mode", ["ref_model", "precompute"])
def test_dpo_cli_end_to_end(tiny_hf_dir: Path, tmp_path: Path, mode: str) -> None:
    from qwenkit.cli.main import main

    data = write_prefs(tmp_path / "prefs.jsonl")
    out = tmp_path / "run"
    extra = ["--precompute-ref"] if mode == "precompute" else []
    assert main(dpo_args(tiny_hf_dir, data, out, "--max-steps", "3", "eval_examples=4", *extra)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):  # fmt: skip
        assert all(isinstance(r[key], float) for r in steps), key
    # step 1: the policy is the reference, so the rewards are 0 and the loss is log 2
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3] and "eval_rewards/accuracies" in evals[-1]
    assert evals[-1]["eval_loss"] != evals[0]["eval_loss"]
    assert (out / "checkpoint-000003" / "model.safetensors").is_file()
    assert (out / "ref_logps.pt").is_file() == (mode == "precompute")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and "eval_rewards/accuracies_end" in summary


def test_resume_with_precomputed_reference_is_exact(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """Resuming elsewhere (no cached ref_logps.pt) recomputes the reference from the starting model,
    not from the checkpoint: the result equals a straight run."""
    from safetensors.torch import load_file

    from qwenkit.cli.main import main

    data = write_prefs(tmp_path / "prefs.jsonl")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(dpo_args(tiny_hf_dir, data, straight, "--max-steps", "4", "save_every=2", "--precompute-ref")) == 0
    assert main(dpo_args(tiny_hf_dir, data, resumed, "--max-steps", "4", "--precompute-ref",
                         "--resume", str(straight / "checkpoint-000002"))) == 0  # fmt: skip
    a = load_file(str(straight / "checkpoint-000004" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoint-000004" / "model.safetensors"))
    start = load_file(str(tiny_hf_dir / "model.safetensors"))
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-3  # it trained
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_dpo_lora_learns(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """LoRA with the adapter-disabled reference: the training loss falls on a consistent preference."""
    from qwenkit.cli.main import main

    data = write_prefs(tmp_path / "prefs.jsonl", n=8, parity=False)
    out = tmp_path / "lora"
    assert main(dpo_args(tiny_hf_dir, data, out, "--max-steps", "6", "--lora", "lr=5e-3", "min_lr=5e-3", "beta=0.5",
                         "batch_size=8", "micro_batch_size=8")) == 0  # fmt: skip
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if "loss" in r]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # B = 0: policy == reference
    assert losses[-1] < losses[0] - 0.05, losses
    assert steps[-1]["rewards/accuracies"] > 0.5
    assert (out / "checkpoint-000006" / "adapter_model.safetensors").is_file()


def test_dpo_config_validation() -> None:
    from qwenkit.train.config import TrainConfigError, build_config

    cfg = build_config("dpo", {})
    assert (cfg.beta, cfg.loss_type, cfg.label_smoothing, cfg.precompute_ref) == (0.1, "sigmoid", 0.0, False)
    with pytest.raises(TrainConfigError, match="loss_type"):
        build_config("dpo", {"loss_type": "grpo"})
    with pytest.raises(TrainConfigError, match="label_smoothing"):
        build_config("dpo", {"loss_type": "robust", "label_smoothing": "0.5"})
