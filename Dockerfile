# qwenkit CPU image: `docker build -t qwenkit .` then
#   docker run -p 8000:8000 -v qwenkit-models:/models qwenkit            (the default 0.5B model)
#   docker run -p 8000:8000 -v qwenkit-models:/models qwenkit qwen2.5-coder-1.5b-instruct --host 0.0.0.0
# The model is pulled into /models (QWENKIT_HOME) on first start; mount a volume to keep it.
#
# CUDA variant: start FROM an image with a CUDA runtime that matches the torch wheel, e.g.
#   FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04   (then apt-get install python3 python3-pip)
# and install torch from https://download.pytorch.org/whl/cu128 instead of .../whl/cpu; run with
# `docker run --gpus all ...`. `--tensor-parallel-size N` then uses NCCL across the N GPUs.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    QWENKIT_HOME=/models

# gcc: qwenkit's C kernels are compiled at first use (qwenkit.cpu.build), for the host CPU.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# torch first (its own index, CPU wheel) so the layer is cached across source changes.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && useradd --create-home --uid 1000 qwenkit && mkdir -p /models && chown qwenkit /models
USER qwenkit
VOLUME ["/models"]

EXPOSE 8000
# Liveness: /health is 200 while the model loads and after; /ready (readiness) waits for the load.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]

ENTRYPOINT ["qwenkit", "serve"]
CMD ["qwen2.5-coder-0.5b-instruct", "--host", "0.0.0.0", "--port", "8000"]
