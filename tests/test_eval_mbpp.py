"""MBPP+ through the sandbox, scored like evalplus: canonical solutions pass, wrong ones fail."""
from __future__ import annotations

import gzip
import hashlib

import pytest

import qwenkit.eval.mbpp as mbpp_mod
from qwenkit.errors import QwenkitError
from qwenkit.eval.mbpp import MBPP_PLUS_SHA256, PACKAGED_PATH, MbppPlus, deserialize_inputs, find_mbpp_plus, load_tasks


@pytest.fixture(scope="module")
def mb() -> MbppPlus:
    return MbppPlus(PACKAGED_PATH)


def test_dataset(mb, monkeypatch):
    monkeypatch.delenv(mbpp_mod.ENV_PATH, raising=False)
    assert find_mbpp_plus() == PACKAGED_PATH
    assert hashlib.sha256(gzip.decompress(PACKAGED_PATH.read_bytes())).hexdigest() == MBPP_PLUS_SHA256
    assert PACKAGED_PATH.with_name("MbppPlus-v0.1.0.LICENSE.txt").is_file()
    assert len(mb.problems) == 399
    t = mb.problems["Mbpp/2"]
    assert t["entry_point"] == "similar_elements"
    assert all(isinstance(a, tuple) for inp in t["base_input"] for a in inp)  # JSON lists -> tuples


def test_deserialize_inputs_restores_python_types():
    assert deserialize_inputs("Mbpp/2", [[[1, 2], [3]]]) == [[(1, 2), (3,)]]
    assert deserialize_inputs("Mbpp/124", [[1, "1+2j"]]) == [(1.0, 1 + 2j)]
    assert deserialize_inputs("Mbpp/115", [[[[1], []]]]) == [[[{1}, {}]]]
    assert deserialize_inputs("Mbpp/580", [[[1, [2, 3]], 4]]) == [((1, (2, 3)), 4)]
    assert deserialize_inputs("Mbpp/3", [[5]]) == [[5]]  # untouched


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(QwenkitError, match="not found"):
        find_mbpp_plus(tmp_path / "nope.jsonl")


def test_overrides_plain_and_gz(tmp_path, monkeypatch, caplog):
    raw = gzip.decompress(PACKAGED_PATH.read_bytes())
    lines = raw.split(b"\n")
    (tmp_path / "MbppPlus-v0.1.0.jsonl").write_bytes(raw)
    assert find_mbpp_plus(tmp_path) == tmp_path / "MbppPlus-v0.1.0.jsonl"  # a folder works too
    monkeypatch.setenv(mbpp_mod.ENV_PATH, str(tmp_path / "MbppPlus-v0.1.0.jsonl"))
    assert len(load_tasks()) == 399
    subset = tmp_path / "subset.jsonl.gz"
    subset.write_bytes(gzip.compress(b"\n".join(lines[:2])))
    with caplog.at_level("WARNING", logger="qwenkit.eval.mbpp"):
        assert list(load_tasks(subset)) == ["Mbpp/2", "Mbpp/3"]  # $QWENKIT_MBPP_PLUS loses to a path
    assert "not evalplus" in caplog.text


def test_corrupt_packaged_copy_is_an_error_naming_it(tmp_path, monkeypatch):
    raw = gzip.decompress(PACKAGED_PATH.read_bytes())
    bad = (tmp_path / "MbppPlus-v0.1.0.jsonl.gz").resolve()
    bad.write_bytes(gzip.compress(raw.replace(b"similar_elements", b"similar_elementz", 1)))
    monkeypatch.setattr(mbpp_mod, "PACKAGED_PATH", bad)
    monkeypatch.delenv(mbpp_mod.ENV_PATH, raising=False)
    with pytest.raises(QwenkitError, match="corrupt") as e:
        load_tasks()
    assert str(bad) in str(e.value)
    bad.write_bytes(b"not gzip")
    with pytest.raises(QwenkitError, match="not a valid gzip") as e:
        load_tasks()
    assert str(bad) in str(e.value)


# Mbpp/2: set-equality oracle; /124: complex inputs + float outputs (allclose); /115: sets;
# /164, /737: special oracles; /770: plain ints; /82: atol
@pytest.mark.parametrize("task_id", ["Mbpp/2", "Mbpp/124", "Mbpp/115", "Mbpp/164", "Mbpp/737", "Mbpp/770", "Mbpp/82"])
def test_canonical_solutions_pass_base_and_plus(mb, task_id):
    out = mb.check(task_id, mb.canonical_solution(task_id))
    assert out.passed and out.plus_passed, out


def test_wrong_solutions_fail(mb):
    tid = "Mbpp/770"  # odd_num_sum(n): sum of 4th powers of the first n odd numbers
    right = "def odd_num_sum(n):\n    return sum((2 * i - 1) ** 4 for i in range(1, n + 1))\n"
    assert mb.check(tid, right).plus_passed
    wrong = {
        "wrong": "def odd_num_sum(n):\n    return n\n",
        "name": "def odd_sum(n):\n    return 0\n",
        "syntax": "def odd_num_sum(n)\n    return n\n",
        "crash": "def odd_num_sum(n):\n    return 1 / 0\n",
    }
    for why, code in wrong.items():
        out = mb.check(tid, code)
        assert not out.passed and not out.plus_passed, why


def test_base_only_solution_fails_plus(mb):
    # right on the 3 original MBPP inputs, wrong on evalplus's extra ones
    tid = "Mbpp/770"
    inputs = [inp[0] for inp in mb.problems[tid]["base_input"]]
    table = {n: sum((2 * i - 1) ** 4 for i in range(1, n + 1)) for n in inputs}
    out = mb.check(tid, f"def odd_num_sum(n):\n    return {table!r}.get(n, -1)\n")
    assert out.passed and not out.plus_passed and out.plus_status == "fail"


def test_slow_solution_times_out(mb):
    tid = "Mbpp/770"
    code = "import time\ndef odd_num_sum(n):\n    time.sleep(5)\n    return 0\n"
    out = mb.check(tid, code)
    assert not out.passed and out.status == "timeout"


def test_hang_at_module_level_fails_fast(mb, monkeypatch):
    import time

    import qwenkit.eval.mbpp as mbpp_mod

    monkeypatch.setattr(mbpp_mod, "MODULE_TIME_LIMIT_S", 1.0)
    t0 = time.monotonic()
    out = mb.check("Mbpp/770", "while True:\n    pass\n")
    assert not out.passed and not out.plus_passed
    assert out.status == "timeout" and time.monotonic() - t0 < 30


@pytest.mark.slow  # minutes: every canonical solution on all ~42k base + plus inputs
def test_all_399_canonical_solutions():
    from qwenkit.eval.checker import parallel_map

    mb = MbppPlus()
    ids = list(mb.problems)
    outs = parallel_map(lambda t: mb.check(t, mb.canonical_solution(t)), ids)
    base = sum(o.passed for o in outs)
    plus = sum(bool(o.plus_passed) for o in outs)
    failed = {t: (o.status, o.plus_status, o.error) for t, o in zip(ids, outs) if not o.plus_passed}
    assert (base, plus) == (399, 399), failed
