"""Qwen2.5-VL image path speed: qwenkit vs transformers on the same random vision tower.

Per image: preprocessing (qwenkit's `ImageProcessor` vs transformers' `Qwen2VLImageProcessorPil`)
and the vision encoder (patch embedding, window / full attention blocks, merger: qwenkit's
`VisionTransformer` vs transformers' `Qwen2_5_VisionTransformerPretrainedModel`, sdpa), fp32,
same weights (ours loads transformers' state dict). The default tower is Qwen2.5-VL-3B's vision
config (depth 32, hidden 1280, 16 heads, window 112, full attention in blocks 7/15/23/31).
Best of `--repeats` after a warm-up; prints the CPU flags and the ratios, `--json` writes all.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable


def log(msg: str) -> None:
    print(f"[bench vl] {msg}", file=sys.stderr, flush=True)


def vision_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "depth": args.depth, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "hidden_act": "silu",
        "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 112,
        "fullatt_block_indexes": [i for i in (7, 15, 23, 31) if i < args.depth], "out_hidden_size": 2048,
        "in_chans": 3, "tokens_per_second": 2,
    }  # fmt: skip


def best_of(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best time of each, after a warm-up; the runs go round robin (a shared machine's load hits
    every engine alike)."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="448x448", help="image WIDTHxHEIGHT (default 448x448: 1024 patches, 256 tokens)")
    p.add_argument("--depth", type=int, default=32, help="vision blocks (default 32, the 3B/7B tower)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")


def cmd_vl(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    import transformers
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from qwenkit import cpu
    from qwenkit.bench.train import environment, environment_lines
    from qwenkit.model.vision import VisionConfig, VisionTransformer
    from qwenkit.multimodal.processor import ImageProcessor

    if args.threads:
        torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.lower().split("x"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    vcfg = vision_config(args)
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2_5_VLConfig(vision_config=vcfg, hidden_size=2048).vision_config
    hf_cfg._attn_implementation = "sdpa"
    ref = transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel(hf_cfg).eval()
    ours = VisionTransformer(VisionConfig.from_hf(vcfg)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    cpu.install(ours)

    proc, hf_proc = ImageProcessor(), Qwen2VLImageProcessorPil()
    px = proc([image])
    grid = px.image_grid_thw
    log(f"image {w}x{h} -> grid {grid[0]}: {px.pixel_values.shape[0]} patches, {px.pixel_values.shape[0] // 4} tokens")
    rows = best_of({"preprocess qwenkit": lambda: proc([image]),
                    "preprocess transformers": lambda: hf_proc([image], return_tensors="pt")}, args.repeats)  # fmt: skip
    with torch.inference_mode():
        rows.update(best_of({"encoder qwenkit": lambda: ours(px.pixel_values, grid),
                             "encoder transformers": lambda: ref(px.pixel_values, grid_thw=torch.tensor(grid))},
                            args.repeats))  # fmt: skip
        err = float((ours(px.pixel_values, grid) - ref(px.pixel_values, grid_thw=torch.tensor(grid)).pooler_output).abs().max())
    env = environment(torch.get_num_threads())
    lines = [f"Qwen2.5-VL image path, {w}x{h} image, vision depth {args.depth} (3B tower), fp32",
             f"{'stage':<28}{'seconds':>10}{'vs transformers':>18}"]  # fmt: skip
    for stage in ("preprocess", "encoder"):
        a, b = rows[f"{stage} qwenkit"], rows[f"{stage} transformers"]
        lines.append(f"{stage + ' qwenkit':<28}{a:>10.3f}{b / a:>17.2f}x")
        lines.append(f"{stage + ' transformers':<28}{b:>10.3f}{'1.00x':>18}")
    lines.append(f"max |features difference| {err:.2e}")
    print("\n".join(lines + environment_lines(env)))
    if args.json:
        args.json.write_text(json.dumps({"size": [w, h], "grid_thw": list(grid[0]), "depth": args.depth,
                                         "seconds": rows, "max_abs_diff": err, "environment": env}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="qwenkit bench vl")
    add_arguments(parser)
    sys.exit(cmd_vl(parser.parse_args()))
