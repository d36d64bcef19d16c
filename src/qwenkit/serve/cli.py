"""`qwenkit serve [MODEL] --host --port ...`: the OpenAI-compatible server on uvicorn.

The lead registers it in `qwenkit.cli.main` with `add_serve_parser(subparsers)`;
`python -m qwenkit.serve` runs it standalone.
"""
from __future__ import annotations

import argparse
import logging
import os
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    from qwenkit.loaders.catalog import DEFAULT_MODEL

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, tools, metrics, web chat)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="registry name, .gguf, HF folder or hub id")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model id reported by /v1/models (default: the model's name)")
    p.add_argument("--api-key", default=os.environ.get("QWENKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the API (default: $QWENKIT_API_KEY)")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait beyond --max-num-seqs; more get 429")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a generation is aborted (504)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get to finish on SIGTERM")
    p.add_argument("--allowed-origins", action="append", default=[], help="CORS origin to allow (repeatable, '*' for any)")
    p.add_argument("--no-structured-warmup", action="store_true", help="build the JSON-grammar compiler on first use")
    p.add_argument("--uvicorn-access-log", action="store_true", help="uvicorn's own access log besides the JSON one")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--quantization", "-q", default="auto",
                   help="runtime weight format: auto (= int8, see qwenkit.quant.policy), none (fp32), int8, "
                        "int4, mixed, ... (`qwenkit eval quant` compares them)")  # fmt: skip
    g.add_argument("--lora", default=None, metavar="PATH",
                   help="LoRA adapter folder (peft format) merged into the weights at load, before quantizing")
    from qwenkit.loaders.load import add_rope_scaling_arg

    add_rope_scaling_arg(g)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-memory", default=None, help="KV-cache budget, e.g. 2GiB (default: a share of free RAM)")
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    from qwenkit.engine.kv_cache import add_kv_cache_dtype_arg
    from qwenkit.engine.llm_engine import add_streaming_args
    from qwenkit.engine.parallel import add_parallel_args
    from qwenkit.engine.spec_decode import add_speculative_args
    from qwenkit.model.dca import add_dual_chunk_arg

    add_kv_cache_dtype_arg(g)
    add_streaming_args(g)
    add_speculative_args(p)
    add_parallel_args(g)
    add_dual_chunk_arg(g)
    from qwenkit.serve.vision import add_media_args

    add_media_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def settings_from_args(args: argparse.Namespace) -> Any:
    from qwenkit.serve.settings import ServerSettings

    engine_args: dict[str, Any] = {
        "block_size": args.block_size,
        "enable_prefix_caching": args.enable_prefix_caching,
    }
    if args.kv_cache_dtype != "auto":  # only what the user set, as for the options below
        engine_args["kv_cache_dtype"] = args.kv_cache_dtype
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(args, name) > 1:
            engine_args[name] = getattr(args, name)
    for name in ("max_num_batched_tokens", "max_model_len", "kv_cache_memory", "streaming_window", "num_sink_tokens",
                 "dual_chunk_attention", "pp_micro_batches"):
        if getattr(args, name) is not None:
            engine_args[name] = getattr(args, name)
    from qwenkit.engine.spec_decode import speculative_config_from_args

    spec = speculative_config_from_args(args)
    if spec is not None:
        engine_args["speculative_config"] = spec
    from qwenkit.serve.vision import media_settings_from_args

    origins = tuple(o.strip() for arg in args.allowed_origins for o in arg.split(",") if o.strip())
    return ServerSettings(
        model=str(args.model),
        served_model_name=args.served_model_name,
        api_key=args.api_key or None,
        max_num_seqs=args.max_num_seqs,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout if args.request_timeout and args.request_timeout > 0 else None,
        allowed_origins=origins,
        structured_warmup=not args.no_structured_warmup,
        engine_args=engine_args,
        media=media_settings_from_args(args),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from qwenkit.serve.app import create_app
    from qwenkit.serve.engine_client import load_engine_client

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

    def factory() -> Any:
        from qwenkit.engine.parallel import tp_quantization

        quantization = tp_quantization(args.quantization, args.tensor_parallel_size * args.pipeline_parallel_size)
        return load_engine_client(
            settings.model, served_model_name=settings.served_model_name, dtype=dtype,
            max_num_seqs=settings.max_num_seqs, quantization=quantization, lora=args.lora,
            rope_scaling=args.rope_scaling, **settings.engine_args,
        )  # fmt: skip

    if args.tensor_parallel_size * args.pipeline_parallel_size > 1 and int(os.environ.get("RANK", "0")) > 0:
        factory()  # a torchrun rank other than 0: follows rank 0's steps, then exits (no HTTP)
        return 0
    app = create_app(settings, factory)
    state = app.state.qwenkit

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            state.shutting_down = True  # new requests get 503 while in-flight ones drain
            super().handle_exit(sig, frame)
            # A drained shutdown is a clean exit (status 0): uvicorn would re-raise the signal.
            getattr(self, "_captured_signals", []).clear()

    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=logging.getLogger().getEffectiveLevel(),
        access_log=args.uvicorn_access_log, timeout_graceful_shutdown=args.shutdown_timeout,
        timeout_keep_alive=5,
    )  # fmt: skip
    logger.info("serving %s on http://%s:%d", settings.model, args.host, args.port)
    Server(config).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m qwenkit.serve ...`)."""
    import sys

    parser = argparse.ArgumentParser(prog="qwenkit")
    parser.add_argument("--log-level", default=os.environ.get("QWENKIT_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    return int(args.func(args) or 0)
