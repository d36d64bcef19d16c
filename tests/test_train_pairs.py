"""`qwenkit data pairs`: sampled completions -> sandbox verdicts -> (passing, failing) pairs in TRL's
conversational preference format; resumable; bad task files name the line.

A scripted generator (the `Generator` protocol) makes the outcomes known in advance: each task's
sample j answers with a chosen program (correct, wrong, duplicate, unparsable, truncated). The
sandbox itself decides pass/fail. TRL is the oracle for the format (`is_conversational`,
`maybe_apply_chat_template` with a transformers tokenizer of the same folder, the call
DPOTrainer's dataset preparation makes) and for the prompt: the text DPO trains on must be the
exact text the samples were generated from.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenkit.errors import DataError
from qwenkit.eval.generation import Completion, SampleStore
from qwenkit.train import pairs as P

ADD_OK = "```python\ndef add(a, b):\n    return a + b\n```"
ADD_OK_2 = "Here:\n```python\ndef add(a, b):\n    return b + a\n```"
ADD_BAD = "```python\ndef add(a, b):\n    return a - b\n```"
ADD_SYNTAX = "```python\ndef add(a, b) return\n```"
SQ_OK = "```python\ndef square(x):\n    return x * x\n```"
SQ_BAD = "```python\ndef square(x):\n    return x + x\n```"
REV_OK = "```python\ndef rev(s):\n    return s[::-1]\n```"
REV_BAD = "```python\ndef rev(s):\n    return s\n```"

# task -> sample j -> (completion, finish_reason)
SCRIPT = {
    "T/add": [(ADD_OK, "stop"), (ADD_BAD, "stop"), (ADD_OK, "stop"), (ADD_SYNTAX, "stop"), (ADD_OK_2, "stop"),
              (ADD_BAD, "stop")],
    "T/square": [(SQ_OK, "stop")] * 6,  # all pass: no pair
    "T/rev": [(REV_OK, "length"), (REV_BAD, "stop"), (REV_OK, "stop"), (REV_BAD, "stop"), (REV_BAD, "stop"),
              (REV_BAD, "stop")],  # the first passing one is truncated: not a chosen
}  # fmt: skip
N = 6

TASKS = [
    {"task_id": "T/add", "prompt": '"""Add two numbers.\nassert add(1, 2) == 3\n"""', "entry_point": "add",
     "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]},
    {"task_id": "T/square", "prompt": '"""Square x."""', "entry_point": "square",
     "test": "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n"},
    # MBPP+-style: expected outputs come from the canonical solution, run in the sandbox
    {"task_id": "T/rev", "prompt": '"""Reverse a string."""\n', "entry_point": "rev",
     "canonical_solution": "def rev(s):\n    return ''.join(reversed(s))\n", "base_input": [["abc"], [""]],
     "plus_input": [["racecar!"], ["xy"]], "atol": 0},
]  # fmt: skip


class ScriptedGenerator:
    """Answers request i from SCRIPT by the prompt's task and the sample index (seed - base)."""

    name = "scripted"

    def __init__(self, prompt_task: dict[tuple[int, ...], str], stop_after: int | None = None) -> None:
        self.prompt_task = prompt_task
        self.stop_after = stop_after
        self.calls: list[int] = []

    def generate(self, prompts, params, on_output):  # type: ignore[no-untyped-def]
        self.calls.append(len(prompts))
        for i in reversed(range(len(prompts))):  # out of order, as a batched engine finishes
            if self.stop_after is not None and len(prompts) - 1 - i == self.stop_after:
                raise KeyboardInterrupt  # interrupted mid-run
            text, reason = SCRIPT[self.prompt_task[tuple(prompts[i])]][params[i].seed]
            on_output(i, Completion(text, len(text), reason))


def _fail_generator() -> ScriptedGenerator:
    raise AssertionError("nothing should be resampled")


@pytest.fixture()
def task_file(tmp_path: Path) -> Path:
    f = tmp_path / "tasks.jsonl"
    f.write_text("".join(json.dumps(t) + "\n" for t in TASKS) + "\n")
    return f


@pytest.fixture()
def setup(task_file: Path, tiny_tokenizer, tmp_path: Path):  # type: ignore[no-untyped-def]
    tasks = P.load_tasks(task_file)
    prompt_task = {tuple(tiny_tokenizer.apply_chat_template(t.messages(), add_generation_prompt=True,
                                                            tokenize=True)): t.task_id for t in tasks}  # fmt: skip
    config = P.PairsConfig(n=N, temperature=1.0, seed=0, pairs_per_task=3, max_tokens=64)
    out = tmp_path / "out" / "pairs.jsonl"
    samples, report = P.default_paths(out)

    def run(make_generator, overwrite: bool = False):  # type: ignore[no-untyped-def]
        store = SampleStore(samples, config.meta("tiny", str(task_file)), overwrite=overwrite)
        checks = P.CheckCache(P.checks_path(samples), overwrite=overwrite)
        return P.make_pairs(tasks, tiny_tokenizer, make_generator, config, out, store, checks, report,
                            workers=2, progress=False)  # fmt: skip

    return tasks, prompt_task, run, out, report


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_are_pass_fail_in_trl_format_and_counted(setup, tiny_tokenizer_dir: Path) -> None:  # type: ignore[no-untyped-def]
    tasks, prompt_task, run, out, report_path = setup
    gen = ScriptedGenerator(prompt_task)
    report = run(lambda: gen)
    assert gen.calls == [len(tasks) * N]  # one engine batch
    pairs = _read(out)
    got = [(p["task_id"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs]
    # add: distinct passing [OK, OK_2], distinct failing [BAD, SYNTAX]; diagonals (0,0) (1,1) (0,1)
    # rev: passing [REV_OK] (sample 0 truncated, sample 2 kept), failing [REV_BAD]: one pair
    assert got == [("T/add", ADD_OK, ADD_BAD), ("T/add", ADD_OK_2, ADD_SYNTAX), ("T/add", ADD_OK, ADD_SYNTAX),
                   ("T/rev", REV_OK, REV_BAD)]  # fmt: skip
    # every chosen passes and every rejected fails, re-checked here one by one
    by_id = {t.task_id: t for t in tasks}
    for tid, chosen, rejected in got:
        t = by_id[tid]
        assert P.passed(P.check_solution(t, P.PROTOCOL.postprocess(chosen, t.entry_point)))
        assert not P.passed(P.check_solution(t, P.PROTOCOL.postprocess(rejected, t.entry_point)))

    from transformers import AutoTokenizer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    hf_tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected", "task_id"}
        assert is_conversational(p)
        assert p["prompt"] == by_id[p["task_id"]].messages()
        text = maybe_apply_chat_template({k: p[k] for k in ("prompt", "chosen", "rejected")}, hf_tok)
        ids = hf_tok(text["prompt"], add_special_tokens=False)["input_ids"]
        assert prompt_task[tuple(ids)] == p["task_id"]  # DPO's prompt = the generation prompt, token for token
        assert text["chosen"] == p["chosen"][0]["content"] + "<|im_end|>\n"
        assert text["rejected"] == p["rejected"][0]["content"] + "<|im_end|>\n"

    n_pass = 3 + 6 + 2  # add: OK, OK, OK_2 pass (BAD x2, SYNTAX fail); square: all; rev: 2 of 6
    assert report["tasks"] == 3 and report["samples"] == 3 * N and report["passed"] == n_pass
    assert report["pass_rate"] == round(n_pass / (3 * N), 4)
    assert report["tasks_with_pass"] == 3 and report["tasks_with_both"] == 2 and report["pairs"] == 4
    assert report["passing_truncated"] == 1
    assert report["generation"]["samples_generated"] == 3 * N and report["checks"]["run"] == 3 * N
    assert json.loads(report_path.read_text())["pairs"] == 4


def test_resume_neither_resamples_nor_rechecks(setup) -> None:  # type: ignore[no-untyped-def]
    tasks, prompt_task, run, out, _ = setup
    with pytest.raises(KeyboardInterrupt):
        run(lambda: ScriptedGenerator(prompt_task, stop_after=5))  # 5 samples stored, then interrupted
    gen = ScriptedGenerator(prompt_task)
    report = run(lambda: gen)
    assert gen.calls == [len(tasks) * N - 5]  # only the missing ones
    assert report["generation"]["samples_resumed"] == 5 and report["pairs"] == 4
    first = out.read_text()
    again = run(_fail_generator)  # complete: the generator is never built
    assert again["generation"]["samples_generated"] == 0 and again["checks"]["run"] == 0
    assert again["checks"]["cached"] == 3 * N and out.read_text() == first
    fresh = ScriptedGenerator(prompt_task)
    assert run(lambda: fresh, overwrite=True)["generation"]["samples_generated"] == 3 * N


@pytest.mark.parametrize("line, match", [
    ("{not json", r"tasks\.jsonl:3: invalid JSON"),
    ('{"task_id": "x", "prompt": "p", "entry_point": "f"}', r"tasks\.jsonl:3: task 'x' has no tests"),
    ('{"task_id": "x", "prompt": "p"}', r"tasks\.jsonl:3: needs a non-empty string 'entry_point'"),
    ('{"task_id": "T/add", "prompt": "p", "entry_point": "f", "test": "assert 1"}', r"tasks\.jsonl:3: .*repeats .*:1"),
    ('{"task_id": "y", "prompt": "p", "entry_point": "f", "base_input": [1]}', r"tasks\.jsonl:3: .*canonical_solution"),
])  # fmt: skip
def test_bad_task_file_names_the_line(tmp_path: Path, line: str, match: str) -> None:
    f = tmp_path / "tasks.jsonl"
    f.write_text(json.dumps(TASKS[0]) + "\n\n" + line + "\n")
    with pytest.raises(DataError, match=match):
        P.load_tasks(f)


def test_task_ranges_and_pairing_order() -> None:
    tasks = P.load_tasks()  # the packaged MBPP+
    assert len(tasks) == 399
    first = P.select_tasks(tasks, "1-200")
    assert len(first) == 200 and first[0].task_id == tasks[0].task_id and first[-1].task_id == tasks[199].task_id
    assert [t.task_id for t in P.select_tasks(tasks, "201-399")] == [t.task_id for t in tasks[200:]]
    for bad in ("0-3", "5-400", "3-1", "a"):
        with pytest.raises(ValueError, match="--tasks"):
            P.select_tasks(tasks, bad)
    # the grid's diagonals: every (i, j) once, the first max(np, nf) pairs use every completion
    for n_pass, n_fail in ((3, 2), (2, 5), (1, 1), (4, 4)):
        idx = P.pair_indices(n_pass, n_fail, 100)
        assert sorted(idx) == [(i, j) for i in range(n_pass) for j in range(n_fail)]
        head = idx[: max(n_pass, n_fail)] if n_pass >= n_fail else idx[:n_pass]
        assert {i for i, _ in head} == set(range(n_pass))
    assert P.pair_indices(3, 0, 5) == [] and P.pair_indices(5, 5, 2) == [(0, 0), (1, 1)]
    # MBPP+'s own task: canonical solution passes, a wrong one fails (base + plus suites)
    t = tasks[0]
    assert P.passed(P.check_solution(t, t.mbpp["prompt"] + t.mbpp["canonical_solution"]))
    assert not P.passed(P.check_solution(t, f"def {t.entry_point}(*a):\n    return ()\n"))


def test_cli_runs_on_a_tiny_model(tiny_hf_dir: Path, task_file: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from qwenkit.cli.main import main

    out = tmp_path / "pairs.jsonl"
    argv = ["data", "pairs", str(tiny_hf_dir), "--data", str(task_file), "--tasks", "1-2", "--out", str(out),
            "--n", "2", "--max-tokens", "6", "-q", "none", "--no-progress", "--workers", "2"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "pairs.report.json").read_text())
    assert report["tasks"] == 2 and report["samples"] == 4 and report["generation"]["samples_generated"] == 4
    assert report["settings"]["n"] == 2 and report["model"]
    samples = _read(tmp_path / "pairs.samples.jsonl")
    assert len(samples) == 5 and all(s["num_tokens"] <= 6 for s in samples[1:])  # header + 4 samples
    assert len(_read(out)) == report["pairs"]
    assert "pairs:" in capsys.readouterr().out
    assert main(argv) == 0  # resumed: nothing left to generate
    assert json.loads((tmp_path / "pairs.report.json").read_text())["generation"]["samples_resumed"] == 4
    assert main([*argv[:-2], "--n", "3"]) == 2  # other settings than the stored samples: refused
