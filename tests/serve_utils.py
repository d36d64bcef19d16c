"""Helpers for the server tests: a tiny random Qwen2 as an HF folder (over the tiny generated
tokenizer, or the real one in slow tests), and a `qwenkit serve` subprocess on a free loopback port."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"


def write_tiny_model(out: Path, tokenizer_dir: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """A random 4-layer Qwen2 (hidden 64) over the vocabulary of the tokenizer in `tokenizer_dir`."""
    import torch

    from qwenkit.config import ModelConfig
    from qwenkit.loaders.hf import export_hf
    from qwenkit.model import Qwen2ForCausalLM
    from qwenkit.tokenizer import Tokenizer
    from tests.tiny import tiny_hf_config

    if (out / "config.json").is_file():
        return out
    tok = Tokenizer.from_hf_dir(tokenizer_dir)
    cfg = tiny_hf_config(
        vocab_size=len(tok), max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.pad_token_id, eos_token_id=list(tok.eos_token_ids), **overrides,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(ModelConfig.from_hf(cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    # Sampling defaults without penalties and with top-k (the sampler then sorts K, not V,
    # candidates), so the load test measures the server rather than the sampler.
    generation = {"temperature": 1.0, "top_p": 1.0, "top_k": 20, "repetition_penalty": 1.0,
                  **stop_ids(tok)}  # fmt: skip
    export_hf(model, out, tokenizer=tok, generation=generation)
    return out


def stop_ids(tok: Any) -> dict[str, Any]:
    """generation_config ids of `tok`: export_hf's defaults are the real vocabulary's (151643...),
    and ModelConfig adds 151645/151643 to any model's EOS ids."""
    return {"bos_token_id": tok.pad_token_id, "eos_token_id": list(tok.eos_token_ids)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python -m qwenkit.serve MODEL ...` on loopback; logs go to `log_path`."""

    def __init__(self, model: str | Path, *args: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "qwenkit.serve", str(model), "--host", HOST, "--port", str(self.port), *args]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def wait_ready(self, timeout: float = 180.0, headers: dict[str, str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return int(self.proc.returncode)


def metric_value(text: str, name: str) -> float:
    """The (first) sample of a metric in Prometheus text format."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


class FakeEngine:
    """A scripted `EngineClient`: choice i of a request "generates" `script(prompt_ids, params, i)`
    token by token (with `tokenizer`), `delay` seconds apart. Records requests and aborts."""

    model_name = "fake-model"

    def __init__(self, tokenizer: Any, script: Any = None, *, delay: float = 0.0, max_model_len: int = 256) -> None:
        self.tokenizer = tokenizer
        self.script = script or (lambda prompt_ids, params, i: "Hello world!")
        self.delay = delay
        self.max_model_len = max_model_len
        self.vocab_size = len(tokenizer)
        self.eos_token_ids = tuple(tokenizer.eos_token_ids)
        self.generation_defaults: dict[str, Any] = {}
        self.requests: list[tuple[str, list[int], Any, int]] = []
        self.compiled: list[Any] = []  # structured_outputs passed to compile_structured_output
        self.aborted: list[str] = []
        self.active = 0
        self.shut_down = False

    async def generate(self, prompt_token_ids: list[int], params: Any, request_id: str, priority: int = 0) -> Any:
        import asyncio

        from qwenkit.engine.outputs import CompletionOutput, Logprob, RequestOutput
        from qwenkit.tokenizer import IncrementalDetokenizer

        self.requests.append((request_id, list(prompt_token_ids), params, priority))
        texts = [self.script(prompt_token_ids, params, i) for i in range(params.n)]
        ids = [self.tokenizer.encode(t) for t in texts]
        limit = params.max_tokens or self.max_model_len
        detoks = [IncrementalDetokenizer(self.tokenizer) for _ in texts]
        done = [False] * len(texts)
        finished = False
        prompt_lps = None
        if params.prompt_logprobs is not None:  # every prompt token at -0.25 (the first None)
            prompt_lps = [None] + [{t: Logprob(-0.25, 1, self.tokenizer.decode([t]))} for t in prompt_token_ids[1:]]
        self.active += 1
        try:
            step = 0
            while not all(done):
                await asyncio.sleep(self.delay)
                outs = []
                for i, seq in enumerate(ids):
                    if done[i]:
                        continue
                    tok = seq[step] if step < len(seq) else self.eos_token_ids[0]
                    text = "" if step >= len(seq) else detoks[i].add(tok)
                    reason = "stop" if step >= len(seq) else ("length" if step + 1 >= limit else None)
                    if reason is not None:
                        done[i] = True
                        text += detoks[i].flush()
                    lps = None
                    if params.logprobs is not None:
                        comma = self.tokenizer.encode(",")[0]
                        lps = [{tok: Logprob(-0.5, 1, self.tokenizer.decode([tok])), comma: Logprob(-1.5, 2, ",")}]
                    outs.append(CompletionOutput(i, text, [tok], -0.5 if lps else None, lps, reason))
                step += 1
                finished = all(done)
                yield RequestOutput(request_id, None, list(prompt_token_ids), outs, finished,
                                    prompt_logprobs=prompt_lps if step == 1 else None)  # fmt: skip
        finally:
            self.active -= 1
            if not finished:
                self.aborted.append(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def compile_structured_output(self, so: Any) -> None:
        self.compiled.append(so)

    def warm_up_structured_output(self) -> None:
        pass

    def stats(self) -> Any:
        from qwenkit.serve.engine_client import EngineStats

        return EngineStats(num_requests_running=self.active, num_kv_blocks=100, num_kv_blocks_used=2 * self.active,
                           block_size=16, prefix_cache_queries=64, prefix_cache_hits=32)  # fmt: skip

    def shutdown(self) -> None:
        self.shut_down = True


def tokenizer_dir(config: Any, gguf_path: Path) -> Path:
    from tests.test_tokenizer import hf_dir_for

    return Path(hf_dir_for(config, gguf_path))


def tiny_model_dir(config: Any, tokenizer: Path) -> Path:
    """The tiny served model, built once and cached under pytest's cache dir, over `tokenizer`:
    an HF tokenizer folder (the tiny one) or a GGUF (its tokenizer: the real one)."""
    import hashlib

    tok_dir = Path(tokenizer) if Path(tokenizer).is_dir() else tokenizer_dir(config, tokenizer)
    h = hashlib.sha256(Path(__file__).read_bytes())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        h.update((tok_dir / name).read_bytes())
    key = h.hexdigest()[:12]
    try:
        root = Path(config.cache.mkdir("qwenkit_serve_tiny")) / key
    except Exception:
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="qwenkit_serve_tiny_")) / key
    return write_tiny_model(root, tok_dir)


def wait_ready(client: Any, timeout: float = 60.0) -> None:
    """Poll an in-process app's `/ready` until the engine has loaded (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
