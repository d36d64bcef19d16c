"""GGUF loader on tiny generated files: config, weights, tied heads, corrupted/truncated files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwenkit.errors import ModelIntegrityError
from qwenkit.loaders.gguf import GGUFFile
from qwenkit.loaders.load import build_empty_model
from tests.gguf_tiny import write_tiny_gguf
from tests.tiny import make_hf_and_ours


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "F16"])
def test_tiny_gguf_loads_exact_weights(tmp_path: Path, tied: bool, qtype: str) -> None:
    _, ours = make_hf_and_ours(seed=11, tie_word_embeddings=tied)
    path = tmp_path / "tiny.gguf"
    ref = write_tiny_gguf(path, ours, qtype)
    gf = GGUFFile.open(path)
    cfg = gf.config()
    assert cfg.tie_word_embeddings == tied  # tied <=> no output.weight in the file
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (64, 4, 2)
    assert cfg.rope_theta == ours.config.rope_theta
    weights = dict(gf.iter_weights(progress=False))
    assert set(weights) == set(ref)
    for name, w in weights.items():
        assert torch.equal(w, torch.from_numpy(ref[name]).reshape(w.shape)), name
    model = build_empty_model(cfg, torch.float32, "cpu")
    model.load_weights(weights.items())
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        if qtype == "F32":
            assert torch.equal(model(ids), ours(ids))
        else:
            assert model(ids).isfinite().all()


def test_not_a_gguf_file(tmp_path: Path) -> None:
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ModelIntegrityError, match="not a GGUF file") as e:
        GGUFFile.open(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_gguf_names_file_and_tensor(tmp_path: Path, keep: float) -> None:
    _, ours = make_hf_and_ours(seed=12)
    full = tmp_path / "full.gguf"
    write_tiny_gguf(full, ours, "Q8_0")
    data = full.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelIntegrityError) as e:
        gf = GGUFFile.open(cut)
        list(gf.iter_weights(progress=False))
    msg = str(e.value)
    assert str(cut) in msg and ("truncated" in msg or "corrupted" in msg)


def test_truncated_header(tmp_path: Path) -> None:
    _, ours = make_hf_and_ours(seed=13)
    full = tmp_path / "full.gguf"
    write_tiny_gguf(full, ours, "F32")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:64])
    with pytest.raises(ModelIntegrityError, match="cut.gguf"):
        GGUFFile.open(cut)


def test_corrupted_scales_are_reported(tmp_path: Path) -> None:
    """Bytes flipped into an fp16 scale that decodes to Inf/NaN -> an error naming the tensor."""
    import gguf

    _, ours = make_hf_and_ours(seed=14)
    path = tmp_path / "bad.gguf"
    write_tiny_gguf(path, ours, "Q8_0")
    gf = GGUFFile.open(path)
    t = next(t for t in gf.reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q8_0)
    offset, name = int(t.data_offset), t.name
    del gf
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 2] = b"\x00\x7c"  # fp16 +Inf as the first block's scale
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelIntegrityError, match=name):
        list(GGUFFile.open(path).iter_weights(progress=False))


def test_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        GGUFFile.open(tmp_path / "nope.gguf")
