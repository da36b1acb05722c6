# The pipeline in a container: `docker build -t aerialseg .` then
#   docker run --rm -v "$PWD:/work" aerialseg            # dvc repro on the mounted project
# CPU wheels by default; for NVIDIA GPUs build with the CUDA wheels of the same torch release:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t aerialseg:cuda .
#   docker run --rm --gpus all -v "$PWD:/work" aerialseg:cuda
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PYTHONUNBUFFERED=1

# git: DVC and the MLflow run tags read the repository.
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/aerialseg
COPY requirements.lock pyproject.toml README.md ./
COPY src ./src
# torch first, from the chosen wheel index; the lock's `torch==` pins are then already satisfied.
RUN TORCH="$(grep -E '^torch==' requirements.lock)" VISION="$(grep -E '^torchvision==' requirements.lock)" \
    && pip install --index-url "${TORCH_INDEX}" "${TORCH}" "${VISION}" \
    && pip install -r requirements.lock \
    && pip install --no-deps -e .

# The project itself is mounted at /work (its git history, params.yaml, data and DVC cache).
WORKDIR /work
RUN git config --global --add safe.directory /work
CMD ["dvc", "repro"]
