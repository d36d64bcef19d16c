"""Qwen2.5-VL against transformers (the oracle) on a tiny random model (tests/vl_tiny.py):
image preprocessing, vision features, M-RoPE position ids, logits, weight loading under both
naming schemes, and the engine (greedy == transformers' generate, batching with text-only
requests, chunked prefill cutting an image, preemption without re-encoding, prefix caching
keyed by the image)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qwenkit.config import ModelConfig
from qwenkit.model import Qwen2_5_VLForConditionalGeneration, causal_lm_class
from qwenkit.model.qwen2_5_vl import mrope_positions
from qwenkit.multimodal.processor import ImageProcessor, ImageSizeError, smart_resize
from tests.vl_tiny import IMAGE_PAD, MAX_PIXELS, MIN_PIXELS, VISION_END, VISION_START, make_tiny_vl, make_tiny_vl_reference

# fp32 everywhere; relative to the largest magnitude of the reference tensor
PIXEL_TOL = 1e-5
FEATURE_TOL = 1e-5
LOGITS_TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def make_images():
    """Two RGB images of different sizes, neither a multiple of 28; one with alpha."""
    from PIL import Image

    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8))  # -> 56 x 112: 8 tokens
    b = Image.fromarray(rng.integers(0, 256, (90, 150, 4), dtype=np.uint8), "RGBA")  # -> 84 x 140: 15 tokens
    return [a, b]


@pytest.fixture(scope="module")
def ref():
    return make_tiny_vl_reference()


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory) -> Path:
    return make_tiny_vl(tmp_path_factory.mktemp("tiny_vl"))


@pytest.fixture(scope="module")
def ours(ref, vl_dir):
    from qwenkit.loaders.load import load

    return load(vl_dir, quantization="none", progress=False).model


def hf_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def prompt_ids(processed, text_before=(10, 11, 12), text_between=(13, 14), text_after=(15, 16, 17)) -> list[int]:
    """Text, image 0, text, image 1, text with each image expanded to its t*h*w/4 pad tokens."""
    ids = list(text_before)
    for i, (t, h, w) in enumerate(processed.image_grid_thw):
        ids += [VISION_START] + [IMAGE_PAD] * (t * h * w // 4) + [VISION_END]
        ids += list(text_between if i == 0 else text_after)
    return ids


# ---------------------------------------------------------------- preprocessing
def test_pixel_values_equal_transformers_image_processor():
    images = make_images()
    want = hf_processor()(images, return_tensors="pt")
    got = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)(images)
    assert got.image_grid_thw == [tuple(g) for g in want["image_grid_thw"].tolist()] == [(1, 4, 8), (1, 6, 10)]
    assert got.pixel_values.shape == want["pixel_values"].shape == (32 + 60, 3 * 2 * 14 * 14)
    assert rel_err(got.pixel_values, want["pixel_values"]) <= PIXEL_TOL


def test_smart_resize_limits_and_config(tmp_path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    for h, w in [(70, 100), (10, 10), (4000, 3000), (28, 5000), (333, 777)]:
        assert smart_resize(h, w, 28, MIN_PIXELS, MAX_PIXELS) == hf_smart_resize(h, w, 28, MIN_PIXELS, MAX_PIXELS)
    with pytest.raises(ImageSizeError, match="aspect ratio"):
        smart_resize(10, 2010)
    (tmp_path / "preprocessor_config.json").write_text('{"min_pixels": 100, "max_pixels": 5000, "merge_size": 2}')
    p = ImageProcessor.from_pretrained(tmp_path)
    assert (p.min_pixels, p.max_pixels, p.patch_size) == (100, 5000, 14)
    (tmp_path / "preprocessor_config.json").write_text('{"min_pixels": 9000, "max_pixels": 5000}')
    with pytest.raises(ValueError, match="min_pixels"):
        ImageProcessor.from_pretrained(tmp_path)


# ---------------------------------------------------------------- model
def test_config_both_layouts(vl_dir):
    import json

    nested = json.loads((vl_dir / "config.json").read_text())  # transformers 5.x: text_config
    from tests.vl_tiny import tiny_vl_hf_config

    flat = tiny_vl_hf_config()  # the hub checkpoints' flat layout
    a, b = ModelConfig.from_hf(nested), ModelConfig.from_hf(flat)
    assert a.model_type == b.model_type == "qwen2_5_vl" and causal_lm_class(a) is Qwen2_5_VLForConditionalGeneration
    assert (a.hidden_size, a.num_hidden_layers, a.rope_theta, a.rope_scaling) == (64, 2, 10000.0, None)
    assert a.multimodal["mrope_section"] == b.multimodal["mrope_section"] == [2, 3, 3]
    assert a.multimodal["image_token_id"] == IMAGE_PAD
    assert ModelConfig.from_hf(a.to_hf()).multimodal["vision_config"]["depth"] == 2


def test_vision_features_equal_transformers(ref, ours):
    processed = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)(make_images())
    grid = torch.tensor(processed.image_grid_thw)
    with torch.no_grad():
        want = ref.model.get_image_features(processed.pixel_values, grid).pooler_output
        got = ours.encode_images(processed.pixel_values, processed.image_grid_thw)
    assert [g.shape for g in got] == [w.shape for w in want] == [(8, 64), (15, 64)]
    for g, w in zip(got, want):
        assert rel_err(g, w) <= FEATURE_TOL


def test_rope_index_equals_transformers(ref, ours):
    processed = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)(make_images())
    ids = prompt_ids(processed)
    t = torch.tensor([ids])
    want_pos, want_delta = ref.model.get_rope_index(
        t, mm_token_type_ids=(t == IMAGE_PAD).int(), image_grid_thw=torch.tensor(processed.image_grid_thw)
    )
    pos, delta = mrope_positions(ids, processed.image_grid_thw, IMAGE_PAD, 2)
    assert torch.equal(pos, want_pos[:, 0]) and delta == int(want_delta) != 0


def test_logits_equal_transformers(ref, ours):
    processed = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)(make_images())
    ids = torch.tensor([prompt_ids(processed)])
    grid = torch.tensor(processed.image_grid_thw)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=processed.pixel_values, image_grid_thw=grid,
                   mm_token_type_ids=(ids == IMAGE_PAD).int()).logits  # fmt: skip
        got = ours(ids, pixel_values=processed.pixel_values, image_grid_thw=processed.image_grid_thw)
        assert rel_err(got, want) <= LOGITS_TOL
        text = torch.tensor([[5, 6, 7, 8, 9, 10, 300, 400]])  # text only: plain RoPE path
        assert rel_err(ours(text), ref(input_ids=text).logits) <= LOGITS_TOL


def test_weights_load_under_both_names(ref, vl_dir, tmp_path):
    from safetensors.torch import save_file

    from qwenkit.errors import ModelIntegrityError
    from qwenkit.loaders.load import load

    # transformers' in-memory names (model.visual.*, model.language_model.*)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state) and any(k.startswith("model.visual.") for k in state)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (tmp_path / f).write_bytes((vl_dir / f).read_bytes())
    save_file(state, str(tmp_path / "model.safetensors"))
    a = load(tmp_path, quantization="none", progress=False).model
    b = load(vl_dir, quantization="none", progress=False).model  # the hub checkpoints' names
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    del state["model.visual.blocks.1.mlp.up_proj.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelIntegrityError, match=r"visual\.blocks\.1\.mlp\.up_proj\.bias"):
        load(tmp_path, quantization="none", progress=False)
    state["model.visual.blocks.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"visual\.blocks\.1\.mlp\.extra\.weight"):
        load(tmp_path, quantization="none", progress=False)


# ---------------------------------------------------------------- engine
PLACEHOLDER = [VISION_START, IMAGE_PAD, VISION_END]
MAX_TOKENS = 8


def request(images, text=(10, 11, 12), between=(13, 14), after=(15, 16, 17)) -> dict:
    """vLLM's request form: one unexpanded <|image_pad|> per image."""
    ids = list(text) + PLACEHOLDER + list(between) + PLACEHOLDER + list(after)
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": images}}


def hf_greedy(ref, ids: list[int], images=None) -> list[int]:
    """transformers' generate (greedy, no EOS stop) from the expanded prompt."""
    ref.generation_config.eos_token_id = None
    t = torch.tensor([ids])
    kwargs = {}
    if images is not None:
        p = hf_processor()(images, return_tensors="pt")
        kwargs = {"pixel_values": p["pixel_values"], "image_grid_thw": p["image_grid_thw"],
                  "mm_token_type_ids": (t == IMAGE_PAD).int()}  # fmt: skip
    with torch.no_grad():
        out = ref.generate(t, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(ids):].tolist()


def greedy(**kw):
    from qwenkit import SamplingParams

    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def make_llm(vl_dir, **engine_args):
    from qwenkit import LLM

    return LLM(str(vl_dir), quantization="none", **engine_args)


@pytest.fixture(scope="module")
def hf_tokens(ref):
    """transformers' greedy tokens for the image request and for a text-only prompt."""
    images = make_images()
    processed = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)(images)
    ids = prompt_ids(processed)
    text = [5, 6, 7, 8, 9, 10, 300, 400]
    swapped = images[::-1]
    ids_swapped = prompt_ids(ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)(swapped), text_before=(20,))
    return {"ids": ids, "image": hf_greedy(ref, ids, images), "text": hf_greedy(ref, text), "text_ids": text,
            "swapped": hf_greedy(ref, ids_swapped, swapped)}  # fmt: skip


def test_engine_greedy_equals_transformers_batched_with_text(vl_dir, hf_tokens):
    llm = make_llm(vl_dir)
    prompts = [request(make_images()), {"prompt_token_ids": hf_tokens["text_ids"]}, request(make_images()[::-1], text=(20,))]
    outs = llm.generate(prompts, greedy(), use_tqdm=False)  # one batch: 35 + 8 + 33 prompt tokens
    assert outs[0].prompt_token_ids == hf_tokens["ids"]  # placeholders expanded at admission
    assert outs[0].outputs[0].token_ids == hf_tokens["image"]
    assert outs[1].outputs[0].token_ids == hf_tokens["text"]
    assert outs[2].outputs[0].token_ids == hf_tokens["swapped"]
    assert llm.llm_engine.stats()["num_image_encodings"] == 4
    assert llm.llm_engine.stats()["num_steps"] == MAX_TOKENS  # the three prompts were prefilled together


def test_chunked_prefill_cutting_images_equals_unchunked(vl_dir, hf_tokens):
    # 35 prompt tokens in chunks of 6: image 0 spans [4, 12), image 1 [16, 31) -> both are cut
    llm = make_llm(vl_dir, max_num_batched_tokens=6, max_num_seqs=2)
    out = llm.generate(request(make_images()), greedy(logprobs=0), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_tokens["image"]
    assert llm.llm_engine.stats()["num_steps"] >= 6 + MAX_TOKENS - 1
    whole = make_llm(vl_dir).generate(request(make_images()), greedy(logprobs=0), use_tqdm=False)[0]
    assert abs(out.outputs[0].cumulative_logprob - whole.outputs[0].cumulative_logprob) <= 1e-4


def test_int8_kv_cache_with_images(vl_dir, hf_tokens):
    # the image tokens' K/V go through the same int8 write as text tokens; the tiny model's greedy
    # path is robust to that rounding (the int8-vs-fp32 logit bound is in test_kv_int8)
    llm = make_llm(vl_dir, kv_cache_dtype="int8", max_num_batched_tokens=6, max_num_seqs=2)
    out = llm.generate(request(make_images()), greedy(logprobs=0), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_tokens["image"]
    assert llm.llm_engine.kv_cache.quantized and llm.llm_engine.kv_cache.k_cache[0].dtype == torch.int8


def test_preempted_request_is_not_re_encoded(vl_dir, hf_tokens):
    # 16 blocks of 4 tokens: one 35-token image request fits, two do not; a higher-priority
    # request arriving mid-decode preempts the first, which is recomputed from its tokens
    llm = make_llm(vl_dir, enable_prefix_caching=False, block_size=4, kv_cache_memory=16 * 4 * 512)
    engine = llm.llm_engine
    assert engine.block_manager.num_blocks == 16
    engine.add_request("low", request(make_images()), greedy())
    for _ in range(3):  # prefill + 2 decodes
        engine.step()
    seq = engine._requests["low"].seqs[0]
    assert seq.num_output_tokens == 3
    engine.add_request("high", request(make_images()), greedy(), priority=-1)
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    assert seq.num_preemptions >= 1 and engine.stats()["num_preemptions"] >= 1
    assert done["low"].outputs[0].token_ids == done["high"].outputs[0].token_ids == hf_tokens["image"]
    assert engine.stats()["num_image_encodings"] == 4  # 2 images x 2 requests: the recompute reused them


def test_prefix_cache_keys_include_the_image(vl_dir, hf_tokens):
    from PIL import Image

    llm = make_llm(vl_dir, block_size=4)
    engine = llm.llm_engine
    first = llm.generate(request(make_images()), greedy(), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and engine.stats()["num_image_encodings"] == 2
    again = llm.generate(request(make_images()), greedy(), use_tqdm=False)[0]
    # 35 tokens: the 8 full blocks (32 tokens) hit, image 1 ends at 31: no image token recomputed
    assert again.num_cached_tokens == 32
    assert engine.stats()["num_image_encodings"] == 2  # nothing left to encode
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == hf_tokens["image"]
    # same text and image sizes, other pixels in image 0: only the block before it may hit
    other = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 100, 3), dtype=np.uint8))
    third = llm.generate(request([other, make_images()[1]]), greedy(), use_tqdm=False)[0]
    assert third.num_cached_tokens == 4
    assert engine.stats()["num_image_encodings"] == 4


def test_chat_with_content_parts(vl_dir, tmp_path):
    import base64
    import io

    a, b = make_images()
    buf = io.BytesIO()
    a.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "compare"}, {"type": "image_url", "image_url": {"url": url}},
        {"type": "image", "image": b}, {"type": "text", "text": "ok"},
    ]}]  # fmt: skip
    llm = make_llm(vl_dir)
    out = llm.chat(messages, greedy(), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": [
        {"type": "text", "text": "compare"}, {"type": "image"}, {"type": "image"}, {"type": "text", "text": "ok"}]}],
        tokenize=False, add_generation_prompt=True)  # fmt: skip
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    direct = llm.generate({"prompt": text, "multi_modal_data": {"image": [a, b]}}, greedy(), use_tqdm=False)[0]
    assert out.prompt_token_ids == direct.prompt_token_ids
    assert out.prompt_token_ids.count(IMAGE_PAD) == 8 + 15
    assert out.outputs[0].token_ids == direct.outputs[0].token_ids


def test_bad_image_requests_are_named(vl_dir, tiny_tokenizer):
    from qwenkit import LLM
    from qwenkit.config import ModelConfig as MC
    from qwenkit.model import Qwen2ForCausalLM
    from tests.tiny import tiny_hf_config

    engine = make_llm(vl_dir).llm_engine
    with pytest.raises(ValueError, match=r"request 'x'.*2 <\|image_pad\|> placeholder.*1 image"):
        engine.add_request("x", request(make_images()[:1]), greedy())
    with pytest.raises(ValueError, match=r"request 'y'.*'video'"):
        engine.add_request("y", {"prompt_token_ids": [1, 2], "multi_modal_data": {"video": [1]}}, greedy())
    with pytest.raises(ValueError, match=r"image\[0\] must be a PIL"):
        engine.add_request("z", {"prompt_token_ids": [1, 2] + PLACEHOLDER, "multi_modal_data": {"image": "a.png"}}, greedy())
    text_model = Qwen2ForCausalLM(MC.from_hf(tiny_hf_config()))
    text_llm = LLM(text_model, tiny_tokenizer)
    with pytest.raises(ValueError, match="text-only"):
        text_llm.llm_engine.add_request("t", {"prompt_token_ids": [1, 2], "multi_modal_data": {"image": make_images()}})
    chat = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image", "image": make_images()[0]}]}]
    with pytest.raises(ValueError, match=r"messages\[0\]\.content\[1\]\.image.*text-only"):
        text_llm.chat(chat, greedy(), use_tqdm=False)


def test_int8_language_model_float_vision(vl_dir, hf_tokens):
    from qwenkit import LLM
    from qwenkit.engine.llm_engine import LLMEngine
    from qwenkit.loaders.load import load
    from qwenkit.quant.linear import Int8Linear

    llm = LLM(str(vl_dir), quantization="int8")
    model = llm.llm_engine.model
    assert type(model.visual.blocks[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)
    out = llm.generate(request(make_images()), greedy(), use_tqdm=False)[0]
    assert out.outputs[0].token_ids[0] == hf_tokens["image"][0]  # int8 noise may flip later near-ties
    # an engine built from the bare module still uses the folder's preprocessor_config.json
    engine = LLMEngine(load(vl_dir, quantization="none", progress=False).model)
    assert engine.image_processor.max_pixels == MAX_PIXELS


def test_export_loads_in_transformers(ref, ours, tmp_path):
    import transformers

    from qwenkit.loaders.hf import export_hf

    export_hf(ours, tmp_path)  # the hub layout: flat config, visual.* / model.layers.* names
    back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    processed = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)(make_images())
    ids = torch.tensor([prompt_ids(processed)])
    kw = {"pixel_values": processed.pixel_values, "image_grid_thw": torch.tensor(processed.image_grid_thw),
          "mm_token_type_ids": (ids == IMAGE_PAD).int()}  # fmt: skip
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, **kw).logits, ref(input_ids=ids, **kw).logits)


# Qwen/Qwen2.5-VL-3B-Instruct's config.json (the hub's flat layout)
HUB_3B_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}  # fmt: skip


def test_hub_3b_config_and_every_tensor_maps():
    """The 3B's real config parses as transformers reads it, and every tensor of transformers'
    model of that config (meta device: no memory) loads into ours by name and shape."""
    import transformers

    cfg = ModelConfig.from_hf(HUB_3B_CONFIG)
    hf = transformers.Qwen2_5_VLConfig(**HUB_3B_CONFIG)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.rope_theta, cfg.rms_norm_eps) == (
        hf.text_config.hidden_size, hf.text_config.num_hidden_layers, hf.text_config.num_key_value_heads,
        hf.text_config.rope_parameters["rope_theta"], hf.text_config.rms_norm_eps)  # fmt: skip
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings is True
    assert cfg.multimodal["mrope_section"] == hf.text_config.rope_parameters["mrope_section"]
    with torch.device("meta"):
        ref = transformers.Qwen2_5_VLForConditionalGeneration(hf)
        ours = Qwen2_5_VLForConditionalGeneration(cfg)
    assert ours.visual.config.fullatt_block_indexes == tuple(hf.vision_config.fullatt_block_indexes)
    loaded = ours.load_weights((k, v) for k, v in ref.state_dict().items() if k != "lm_head.weight")
    assert loaded == {n for n, _ in ours.named_parameters(remove_duplicate=False)}


def test_bad_vl_configs_are_named():
    from qwenkit.config import ConfigError
    from tests.vl_tiny import tiny_vl_hf_config

    def build(cfg):
        return Qwen2_5_VLForConditionalGeneration(ModelConfig.from_hf(cfg))

    with pytest.raises(ConfigError, match=r"mrope_section \[2, 3, 4\].*head_dim / 2 = 8"):
        build(tiny_vl_hf_config(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 4]}))
    with pytest.raises(ConfigError, match="yarn"):
        build(tiny_vl_hf_config(rope_scaling={"type": "yarn", "factor": 2}))
    cfg = tiny_vl_hf_config()
    del cfg["vision_config"]
    with pytest.raises(ConfigError, match="vision_config"):
        build(cfg)
    cfg = tiny_vl_hf_config()
    cfg["vision_config"]["out_hidden_size"] = 48
    with pytest.raises(ConfigError, match="out_hidden_size=48"):
        build(cfg)
    cfg = tiny_vl_hf_config()
    cfg["image_token_id"] = 9999
    with pytest.raises(ConfigError, match="image_token_id=9999"):
        build(cfg)
