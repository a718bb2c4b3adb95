# syntax=docker/dockerfile:1
# Two images from one file:
#   runtime  (default): the three services, no torch (slim).
#   models:  the model factory (torch, open_clip, timm) that builds /models.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 miner
WORKDIR /app
COPY pyproject.toml README.md ./
COPY photocore ./photocore
COPY anti_sus ./anti_sus
COPY nomad ./nomad
COPY gallery_bridge ./gallery_bridge
COPY models ./models
COPY stack ./stack

FROM base AS runtime
RUN pip install . && mkdir -p /models /gallery /state && chown miner /models /gallery /state
USER miner
EXPOSE 7777 7778
CMD ["anti-sus", "--help"]

FROM base AS models
# CPU wheels of torch keep this image a few GB smaller than the CUDA default (as `make setup`'s TORCH_INDEX);
# --build-arg TORCH_INDEX= builds from PyPI alone.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} '.[models]' \
 && mkdir -p /models /gallery /state && chown miner /models /gallery /state
USER miner
CMD ["python", "-m", "stack.ensure_models", "--models", "/models"]
