"""Our Qwen2 vs transformers.Qwen2ForCausalLM on tiny random configs (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from qwenkit.engine.contiguous_cache import ContiguousKVCache
from tests.tiny import make_hf_and_ours

CONFIGS = {
    "untied": {},
    "tied": {"tie_word_embeddings": True},
    # Layers with index >= max_window_layers slide (HF semantics); window 5 << sequence length.
    "sliding": {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2},
    "sliding_all_tied": {
        "use_sliding_window": True,
        "sliding_window": 3,
        "max_window_layers": 0,
        "tie_word_embeddings": True,
    },
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name: str) -> None:
    ref, ours = make_hf_and_ours(seed=1, **CONFIGS[name])
    ids = torch.randint(0, 256, (3, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
    assert got.shape == want.shape
    tol = 1e-5 * want.abs().max().item()
    assert (got - want).abs().max().item() <= tol


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_decode_matches_full_recompute(name: str) -> None:
    """Prefill + token-by-token decode through the contiguous cache == one full forward."""
    _, ours = make_hf_and_ours(seed=3, **CONFIGS[name])
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(4))
    cfg = ours.config
    with torch.no_grad():
        full = ours(ids)
        cache = ContiguousKVCache(
            cfg.num_hidden_layers, 2, 32, cfg.num_key_value_heads, cfg.head_dim
        )
        cache.begin(12)
        pos = torch.arange(12).expand(2, 12)
        steps = [ours(ids[:, :12], pos, cache)]
        for t in range(12, 20):
            cache.begin(1)
            steps.append(ours(ids[:, t : t + 1], torch.full((2, 1), t), cache))
    inc = torch.cat(steps, dim=1)
    assert (inc - full).abs().max().item() <= 1e-5 * full.abs().max().item()


def test_flat_input_equals_batched() -> None:
    _, ours = make_hf_and_ours(seed=5)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.allclose(ours(ids)[0], ours(ids[0]), atol=1e-6)


def test_hf_state_dict_round_trip() -> None:
    ref, ours = make_hf_and_ours(seed=6)
    exported = dict(ours.hf_state_dict())
    for name, t in ref.state_dict().items():
        assert torch.equal(exported[name], t), name


def test_config_stop_ids_follow_the_vocabulary() -> None:
    """Qwen's two EOS ids join the config's own stop ids, but only where the vocabulary has them
    (a small vocabulary would otherwise stop on ids it cannot produce and export a BOS it lacks)."""
    from qwenkit.config import ModelConfig
    from tests.tiny import tiny_hf_config

    qwen = ModelConfig.from_hf(tiny_hf_config(vocab_size=151936, eos_token_id=151645, bos_token_id=None))
    assert qwen.eos_token_ids == (151645, 151643) and qwen.to_hf()["bos_token_id"] == 151643
    small = ModelConfig.from_hf(tiny_hf_config(vocab_size=576, eos_token_id=513, bos_token_id=None))
    assert small.eos_token_ids == (513,) and small.to_hf()["bos_token_id"] is None
