"""`qwenkit export`: real 0.5B -> HF folder -> loaded back by qwenkit and by transformers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

@pytest.mark.slow
def test_export_real_05b_round_trip(gguf_05b_path: Path, tmp_path: Path) -> None:
    import transformers

    from qwenkit.cli.main import main
    from qwenkit.loaders.load import load

    out = tmp_path / "hf"
    assert main(["export", str(gguf_05b_path), str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False  # the GGUF holds a separate output.weight
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()

    src = load(gguf_05b_path, progress=False)
    ids = src.tokenizer.encode("def hello_world():\n    print('你好, world')\n")
    x = torch.tensor([ids])
    with torch.inference_mode():
        want = src.model(x)
    del src

    back = load(out, progress=False)
    assert back.source.format == "hf"
    assert back.tokenizer.encode("def hello_world():\n    print('你好, world')\n") == ids
    with torch.inference_mode():
        # Same fp32 weights, same code: bit-identical logits.
        assert torch.equal(back.model(x), want)
    del back

    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = ref(x).logits
    assert (theirs - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode("def hello_world():\n    print('你好, world')\n") == ids


def test_export_tiny_sharded(tmp_path: Path) -> None:
    """Sharded export writes an index, and both loaders read it back."""
    import transformers

    from qwenkit.loaders.hf import export_hf, hf_config, iter_hf_weights
    from qwenkit.loaders.load import build_empty_model
    from tests.tiny import make_hf_and_ours

    ref, ours = make_hf_and_ours(seed=9)
    export_hf(ours, tmp_path, max_shard_bytes=40_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    back = build_empty_model(hf_config(tmp_path), torch.float32, "cpu")
    back.load_weights(iter_hf_weights(tmp_path, progress=False))
    ids = torch.randint(0, 256, (1, 11))
    with torch.no_grad():
        assert torch.equal(back(ids), ours(ids))
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.allclose(hf(ids).logits, ref(ids).logits, atol=1e-5)
