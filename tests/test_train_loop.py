"""The trainer loop end to end on a tiny model: CLI, invariance of the update to micro-batching,
accumulation and world size (2 gloo ranks under torchrun, DDP and FSDP2), exact resume, Ctrl-C,
LoRA, clear errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenkit.cli.main import main

ROOT = Path(__file__).resolve().parents[1]

CONVERSATIONS = [
    [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
    for a in range(7) for b in range(3)
]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as f:
        for msgs in CONVERSATIONS:
            f.write(json.dumps({"messages": msgs}) + "\n")
        for i in range(6):
            f.write(json.dumps({"prompt": f"Count to {i}:", "completion": " " + " ".join(map(str, range(i + 1))) }) + "\n")
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest difference relative to each tensor's scale, floored at 1 (the weights' scale): a
    tensor of tiny values with a near-zero gradient (the k_proj bias) gets updates of +-lr from
    AdamW whatever the gradient's rounding noise, so its own scale would be no yardstick."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1.0)) for k in a)


def base_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "sft", str(model), "--data", str(data), "--out", str(out), "max_length=64", "batch_size=4",
            "lr=1e-3", "min_lr=1e-4", "warmup_steps=1", "progress=false", "tensorboard=false", "seed=3",
            "precision=fp32",
            "--quiet-summary", *extra]


def env_for_subprocess() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_sft_cli_end_to_end(tiny_hf_dir: Path, sft_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(base_args(tiny_hf_dir, sft_data, out, "--max-steps", "6", "eval_examples=4", "lr=1e-2")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu", "peak_rss_gb"):
        assert all(isinstance(r[key], float) for r in steps), key
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]  # lr 1e-2 on a tiny random model: it learns
    ckpt = out / "checkpoint-000006"
    saved_cfg = json.loads((ckpt / "train_config.json").read_text())
    assert saved_cfg["lr"] == 1e-2 and saved_cfg["max_length"] == 64
    # the checkpoint is a servable HF folder
    from qwenkit.loaders.load import load

    lm = load(ckpt, progress=False)
    assert torch.equal(lm.model.model.norm.weight.detach(), weights(ckpt)["model.norm.weight"])


@pytest.mark.parametrize("micro", [1, 2])
def test_update_invariant_to_micro_batching(tiny_hf_dir: Path, sft_data: Path, tmp_path: Path, micro: int) -> None:
    ref = tmp_path / "ref"
    assert main(base_args(tiny_hf_dir, sft_data, ref, "--max-steps", "3", "micro_batch_size=4")) == 0
    got = tmp_path / f"micro{micro}"
    assert main(base_args(tiny_hf_dir, sft_data, got, "--max-steps", "3", f"micro_batch_size={micro}")) == 0
    assert max_rel_diff(weights(got / "checkpoint-000003"), weights(ref / "checkpoint-000003")) <= 1e-5


def test_resume_is_exact_single_process(tiny_hf_dir: Path, sft_data: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert main(base_args(tiny_hf_dir, sft_data, straight, "--max-steps", "5", "save_every=2")) == 0
    resumed = tmp_path / "resumed"
    assert main(base_args(tiny_hf_dir, sft_data, resumed, "--max-steps", "5",
                          "--resume", str(straight / "checkpoint-000002"))) == 0
    assert max_rel_diff(weights(resumed / "checkpoint-000005"), weights(straight / "checkpoint-000005")) <= 1e-6
    state = json.loads((resumed / "checkpoint-000005" / "trainer_state.json").read_text())
    assert state["step"] == 5


def torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--standalone", "-m", "qwenkit", *args]
    proc = subprocess.Popen(cmd, env=env_for_subprocess(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
        out, err = proc.communicate()
    assert proc.returncode == 0, out[-3000:] + err[-5000:]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_ranks_equal_one_process_and_resume(tiny_hf_dir: Path, sft_data: Path, tmp_path: Path, mode: str) -> None:
    one = tmp_path / "one"
    assert main(base_args(tiny_hf_dir, sft_data, one, "--max-steps", "3")) == 0
    extra = ["--fsdp"] if mode == "fsdp" else []
    two = tmp_path / "two"
    torchrun(base_args(tiny_hf_dir, sft_data, two, "--max-steps", "3", "save_every=1", *extra))
    assert max_rel_diff(weights(two / "checkpoint-000003"), weights(one / "checkpoint-000003")) <= 1e-5
    # resume on 2 ranks from step 1 == the straight 2-rank run
    resumed = tmp_path / "resumed"
    torchrun(base_args(tiny_hf_dir, sft_data, resumed, "--max-steps", "3", *extra,
                       "--resume", str(two / "checkpoint-000001")))
    assert max_rel_diff(weights(resumed / "checkpoint-000003"), weights(two / "checkpoint-000003")) <= 1e-6
    # the data position and the optimizer state do not depend on the layout: 2 ranks -> 1 process
    single = tmp_path / "single"
    assert main(base_args(tiny_hf_dir, sft_data, single, "--max-steps", "3", "--resume", str(two / "checkpoint-000001"))) == 0
    assert max_rel_diff(weights(single / "checkpoint-000003"), weights(one / "checkpoint-000003")) <= 1e-5


def test_sigterm_writes_a_checkpoint_and_resume_continues(tiny_hf_dir: Path, sft_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "qwenkit", *base_args(tiny_hf_dir, sft_data, out, "--max-steps", "100000")]
    proc = subprocess.Popen(cmd, env=env_for_subprocess(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600  # generous: the machine may be busy
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"loss"') >= 2):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    assert metrics.exists(), "the run never logged two steps"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    ckpts = sorted(out.glob("checkpoint-*"))
    assert len(ckpts) == 1, err[-3000:]
    step = json.loads((ckpts[0] / "trainer_state.json").read_text())["step"]
    assert step >= 2
    assert main(base_args(tiny_hf_dir, sft_data, out, "--max-steps", str(step + 1), "--resume")) == 0
    assert json.loads((out / f"checkpoint-{step + 1:06d}" / "trainer_state.json").read_text())["step"] == step + 1


def test_lora_run_saves_a_peft_adapter_and_resumes(tiny_hf_dir: Path, sft_data: Path, tmp_path: Path) -> None:
    straight = tmp_path / "lora"
    assert main(base_args(tiny_hf_dir, sft_data, straight, "--lora", "--lora-r", "4", "--max-steps", "4",
                          "save_every=2", "lr=1e-2")) == 0
    final = straight / "checkpoint-000004"
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 32 and len(cfg["target_modules"]) == 7
    resumed = tmp_path / "resumed"
    assert main(base_args(tiny_hf_dir, sft_data, resumed, "--lora", "--lora-r", "4", "--max-steps", "4",
                          "lr=1e-2", "--resume", str(straight / "checkpoint-000002"))) == 0
    a = load_file(str(final / "adapter_model.safetensors"))
    b = load_file(str(resumed / "checkpoint-000004" / "adapter_model.safetensors"))
    assert max_rel_diff(b, a) <= 1e-6
    assert max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k) > 0  # it trained
    from qwenkit.loaders.load import load

    base = load(tiny_hf_dir, progress=False).model
    tuned = load(tiny_hf_dir, progress=False, lora=final).model
    ids = torch.tensor([[1, 2, 3, 4]])
    assert not torch.allclose(base(ids), tuned(ids))


def test_bad_data_names_file_and_line(tiny_hf_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n')
    assert main(["train", "sft", str(tiny_hf_dir), "--data", str(bad), "--out", str(tmp_path / "o"), "progress=false"]) == 2
    assert "bad.jsonl" in caplog.text and "line 2" in caplog.text
    assert main(["train", "sft", str(tiny_hf_dir), "--data", str(bad), "--out", str(tmp_path / "o"), "lr=fast"]) == 2
    assert "'lr'" in caplog.text


def test_memory_estimate_refuses_a_run_that_cannot_fit(tiny_hf_dir: Path, sft_data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from qwenkit.train import recipes

    monkeypatch.setattr(recipes, "_available_bytes", lambda: 1024**2)
    assert main(base_args(tiny_hf_dir, sft_data, tmp_path / "o", "--max-steps", "1")) == 2
    assert "GiB is available" in caplog.text


def test_bf16_autocast_lora_run(tiny_hf_dir: Path, sft_data: Path, tmp_path: Path) -> None:
    """bf16 autocast (frozen base linears stored in bf16) trains and its loss tracks fp32's."""
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(base_args(tiny_hf_dir, sft_data, out, "--lora", "--max-steps", "2", f"precision={precision}")) == 0
        runs[precision] = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(runs["bf16"]) == 2
    assert abs(runs["bf16"][0] - runs["fp32"][0]) <= 2e-2 * runs["fp32"][0]


def test_gradient_checkpointing_gives_the_same_update(tiny_hf_dir: Path, sft_data: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    assert main(base_args(tiny_hf_dir, sft_data, ref, "--max-steps", "2")) == 0
    ckpt = tmp_path / "ckpt"
    assert main(base_args(tiny_hf_dir, sft_data, ckpt, "--max-steps", "2", "gradient_checkpointing=true")) == 0
    assert max_rel_diff(weights(ckpt / "checkpoint-000002"), weights(ref / "checkpoint-000002")) <= 1e-6


def test_pretrain_on_token_shards_with_length_buckets(tiny_hf_dir: Path, tiny_tokenizer, tmp_path: Path) -> None:
    from qwenkit.data.shards import ShardWriter

    shards = tmp_path / "shards"
    texts = [" ".join(f"word{i * j % 97}" for j in range(n)) for i, n in enumerate([5, 40, 90, 12, 200, 33, 70, 8] * 3)]
    with ShardWriter(shards, "part-00000", vocab_size=len(tiny_tokenizer), tokenizer="tiny") as w:
        for t in texts:
            w.append(tiny_tokenizer.encode(t) + [tiny_tokenizer.eos_token_id])
    out = tmp_path / "cpt"
    args = ["train", "pretrain", str(tiny_hf_dir), "--data", str(shards), "--out", str(out), "max_length=64",
            "bucket_lengths=32,64", "token_budget=128", "--max-steps", "3", "progress=false", "tensorboard=false",
            "precision=fp32", "--quiet-summary"]
    assert main(args) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(rows) == 3
    assert all(r["tokens"] <= 128 for r in rows)  # the token budget per step (padding excluded)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["format"] == "token_shards"
