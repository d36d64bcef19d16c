"""qwenkit's fast GGUF header parser == gguf.GGUFReader (fields, tensor infos, data bytes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qwenkit.loaders.gguf_reader import FastGGUFReader, GGUFFormatError
from tests.gguf_tiny import write_tiny_gguf
from tests.tiny import make_hf_and_ours


def _same_as_gguf_package(path: Path) -> None:
    import gguf

    ref = gguf.GGUFReader(path)
    ours = FastGGUFReader(path)
    ref_fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert set(ref_fields) == set(ours.fields)
    for k, v in ref_fields.items():
        assert ours.fields[k] == v, k
    assert len(ours.tensors) == len(ref.tensors)
    for a, b in zip(ref.tensors, ours.tensors):
        assert (a.name, tuple(int(x) for x in a.shape), a.tensor_type) == (b.name, b.shape, b.tensor_type)
        assert (int(a.data_offset), int(a.n_bytes)) == (b.data_offset, b.n_bytes)
        assert np.array_equal(np.asarray(a.data).reshape(-1).view(np.uint8), b.data)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q5_0"])
def test_tiny_file_matches_gguf_package(tmp_path: Path, qtype: str) -> None:
    _, ours = make_hf_and_ours(seed=21, intermediate_size=256, hidden_size=256)
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path, ours, qtype)
    _same_as_gguf_package(path)


@pytest.mark.slow
def test_real_file_matches_gguf_package(gguf_05b_path: Path) -> None:
    _same_as_gguf_package(gguf_05b_path)


def test_garbage_is_a_format_error(tmp_path: Path) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(GGUFFormatError):
        FastGGUFReader(p)
