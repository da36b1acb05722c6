# The pipeline's environment as an image: the locked runtime dependencies, and NOT the project's code.
# The project (its src/, params.yaml, git history, data and DVC cache) is mounted at /work/project
# when the container starts, and that mounted src/ is what runs, so the code a stage runs is the
# code DVC hashes: edit src/ on the host, and the next `dvc repro` in the container runs the edit.
#
#   docker build -t aerialseg .
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:/work/project" aerialseg            # dvc repro
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:/work/project" aerialseg aerialseg --version
#
# `--user $(id -u):$(id -g)` makes the files the stages write belong to you, not to uid 1000 (the
# image's default user). CPU wheels of torch by default; for NVIDIA GPUs build with the CUDA wheels
# of the same torch release and run with `--gpus all`:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t aerialseg:cuda .
# On a cluster, run it with Apptainer (README, "Containers").
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# PYTHONNOUSERSITE: Apptainer mounts the host's home, whose ~/.local packages must not shadow the lock.
# HOME: a writable home for whatever uid `--user` picks (Hugging Face cache, matplotlib, git).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PYTHONUNBUFFERED=1 \
    PYTHONNOUSERSITE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/aerialseg

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# git: DVC and the MLflow run tags read the repository. Debian's git, whatever its current patch
# release: pinning it would break the build at each security update of the base image.
# safe.directory (system-wide, so for every uid): the mounted repository belongs to the host user.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory /work/project \
    && useradd --uid 1000 --user-group --create-home --home-dir /home/aerialseg --shell /bin/bash aerialseg \
    && chmod 1777 /home/aerialseg

# The runtime lock only (requirements-dev.lock's test and lint tools are not needed to run the
# pipeline). torch first, from the chosen wheel index; the lock's `torch==` pins are then satisfied.
# (DL3013: the torch pins are the lock's, read into ${TORCH} and ${VISION}, which hadolint cannot see.)
COPY requirements.lock /tmp/requirements.lock
# hadolint ignore=DL3013
RUN python -m venv /opt/venv \
    && TORCH="$(grep -E '^torch==' /tmp/requirements.lock)" \
    && VISION="$(grep -E '^torchvision==' /tmp/requirements.lock)" \
    && pip install --index-url "${TORCH_INDEX}" "${TORCH}" "${VISION}" \
    && pip install --requirement /tmp/requirements.lock \
    && rm /tmp/requirements.lock

# The package is installed in editable mode FROM THE MOUNT POINT: with the src/ layout, setuptools'
# editable install is a .pth file that puts /work/project/src on sys.path, plus the package's
# metadata (`aerialseg --version`) and the `aerialseg` command. The src/ here is an empty
# placeholder, deleted again: at run time the mounted project's src/aerialseg is the one imported
# (nothing is mounted: `ModuleNotFoundError: aerialseg`).
COPY pyproject.toml README.md LICENSE /work/project/
RUN mkdir -p /work/project/src/aerialseg \
    && touch /work/project/src/aerialseg/__init__.py \
    && pip install --no-deps --no-build-isolation --editable /work/project \
    && rm -rf /work/project/src /work/project/build /work/project/pyproject.toml /work/project/README.md /work/project/LICENSE

USER 1000:1000
WORKDIR /work/project
CMD ["dvc", "repro"]
