"""The sandbox: runaway or hostile generated code fails, and never harms or hangs the harness."""
from __future__ import annotations

import os
import socket
import time

import pytest

from qwenkit.eval.sandbox import UID_BASE, SandboxLimits, _live_pids_of_uid, isolation, run_python

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="uid drop / process kill by uid needs root")


def test_runs_code_and_reports_output():
    res = run_python("import sys\nprint(6 * 7)\nprint('err', file=sys.stderr)")
    assert res.ok, res
    assert res.stdout == b"42\n"
    assert res.stderr == b"err\n"


def test_exception_is_a_failure_not_a_raise():
    res = run_python("raise ValueError('boom')")
    assert res.returncode == 1 and not res.ok
    assert "ValueError: boom" in res.describe()


def test_environment_is_scrubbed_and_cwd_is_a_fresh_tempdir(monkeypatch):
    monkeypatch.setenv("QWENKIT_TEST_SECRET", "hunter2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    code = (
        "import os, json\n"
        "print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd(), 'files': os.listdir('.')}))\n"
    )
    res = run_python(code, files={"data.txt": "hi"})
    assert res.ok, res.describe()
    import json

    info = json.loads(res.stdout)
    assert "hunter2" not in res.stdout.decode()
    assert set(info["env"]) >= {"PATH", "HOME"} and "QWENKIT_TEST_SECRET" not in info["env"]
    assert info["env"]["HOME"] == info["cwd"] and "qwenkit-sandbox-" in info["cwd"]
    assert "data.txt" in info["files"]
    assert not os.path.exists(info["cwd"]), "the sandbox dir must be deleted afterwards"


def test_collects_files_left_by_the_code():
    res = run_python("open('out.bin', 'wb').write(b'abc')", collect=["out.bin", "missing.bin"])
    assert res.files == {"out.bin": b"abc"}


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    res = run_python("while True:\n    pass", limits=SandboxLimits(timeout_s=1.5))
    assert res.timed_out and not res.ok
    assert time.monotonic() - t0 < 10


def test_sleeping_forever_times_out():
    res = run_python("import time\ntime.sleep(3600)", limits=SandboxLimits(timeout_s=1.0))
    assert res.timed_out


def test_fork_bomb_is_contained():
    code = (
        "import os\nprint(os.getuid(), flush=True)\n"
        "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    t0 = time.monotonic()
    res = run_python(code, limits=SandboxLimits(timeout_s=2.0, max_processes=8))
    assert not res.ok
    assert time.monotonic() - t0 < 30
    # the harness can still start processes, and nothing of the bomb is left
    assert run_python("print('alive')").stdout == b"alive\n"
    if IS_ROOT:
        uid = int(res.stdout.split()[0])
        assert uid >= UID_BASE
        assert not _live_pids_of_uid(uid)


def test_huge_allocation_fails_fast():
    t0 = time.monotonic()
    res = run_python("x = bytearray(64 * 1024**3)", limits=SandboxLimits(memory_bytes=1 << 30))
    assert not res.ok and "MemoryError" in res.describe()
    assert time.monotonic() - t0 < 10


def test_growing_list_hits_the_memory_limit():
    code = "x = []\nwhile True:\n    x.append(' ' * 10**6)"
    res = run_python(code, limits=SandboxLimits(memory_bytes=512 << 20, timeout_s=20))
    assert not res.ok and not res.timed_out
    assert "MemoryError" in res.describe() or res.returncode < 0


def test_output_flood_is_cut_off():
    t0 = time.monotonic()
    res = run_python("while True:\n    print('x' * 10000)", limits=SandboxLimits(max_output_bytes=1 << 16))
    assert res.output_limit_exceeded and not res.ok
    assert len(res.stdout) <= 1 << 16
    assert time.monotonic() - t0 < 10


def test_file_size_limit():
    res = run_python("open('big', 'wb').write(b'x' * (8 << 20))", limits=SandboxLimits(max_file_bytes=1 << 20))
    assert not res.ok  # EFBIG / SIGXFSZ


@pytest.fixture
def canary(tmp_path):
    """A directory the harness owns, outside the sandbox, that generated code tries to delete."""
    d = tmp_path / "precious"
    d.mkdir()
    (d / "data.txt").write_text("keep me")
    os.chmod(tmp_path, 0o755)
    return d


@needs_root
def test_destructive_shell_command_cannot_delete_harness_files(canary):
    code = f"import os\nos.system('rm -rf {canary}')\nos.system('rm -rf {canary}/data.txt')\n"
    res = run_python(code)
    assert (canary / "data.txt").read_text() == "keep me"
    assert res.returncode is not None


@needs_root
def test_destructive_libc_call_bypassing_python_cannot_delete_harness_files(canary):
    code = f"import ctypes\nctypes.CDLL(None).system(b'rm -rf {canary}')\nimport shutil\nshutil.rmtree('{canary}')\n"
    res = run_python(code)
    assert not res.ok  # rmtree: PermissionError
    assert (canary / "data.txt").read_text() == "keep me"


@needs_root
def test_runs_as_throwaway_uid_that_cannot_write_outside():
    res = run_python("import os\nprint(os.getuid())\nopen('/etc/qwenkit-sandbox-test', 'w')")
    assert int(res.stdout.split()[0]) >= UID_BASE
    assert "PermissionError" in res.describe()
    assert not os.path.exists("/etc/qwenkit-sandbox-test")


@needs_root
def test_process_that_escapes_the_group_is_killed(tmp_path):
    # a grandchild calls setsid() (leaves the process group) and keeps running
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    while True:\n"
        "        time.sleep(0.05)\n"
        "print(os.getuid(), flush=True)\n"
    )
    res = run_python(code, limits=SandboxLimits(timeout_s=5))
    uid = int(res.stdout.split()[0])
    assert not _live_pids_of_uid(uid)


def test_network_connect_to_localhost_fails():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    code = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "    print('connected')\n"
        "except OSError as e:\n"
        "    print('blocked', e)\n"
    )
    try:
        res = run_python(code)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # no completed handshake is waiting in the backlog
            server.accept()
    finally:
        server.close()
    assert res.stdout.startswith(b"blocked"), res
    assert isolation()["network"] == "blocked"
