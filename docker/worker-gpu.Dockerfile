# syntax=docker/dockerfile:1
# A Celery worker for training jobs on one NVIDIA GPU (queue `gpu`). Run one container per GPU.
# Build from the repository root:  docker build -f docker/worker-gpu.Dockerfile -t nnm-worker-gpu .
# Needs the NVIDIA Container Toolkit on the host (see docker-compose.gpu.yml) and a driver for CUDA 13.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /opt/nnm
# The locked dependencies (docker/requirements/gpu.txt, hash-checked): PyPI's torch with its CUDA
# libraries from pip's nvidia-* wheels (no CUDA base image or toolkit), and faiss-gpu-cu12 (the
# faiss-wheels build, with its CUDA 12 runtime from pip) instead of faiss-cpu. In their own layer,
# before the code. The built-in `mnist5k` needs --build-arg NNM_EXTRAS=small-data.
COPY docker/install.sh docker/
COPY docker/requirements/ docker/requirements/
ARG NNM_EXTRAS=""
RUN --mount=type=cache,target=/root/.cache/pip bash docker/install.sh deps gpu ${NNM_EXTRAS}

COPY pyproject.toml README.md ./
COPY services/ services/
COPY api_schemas/ api_schemas/
RUN bash docker/install.sh project

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/nnm --shell /usr/sbin/nologin nnm \
    && mkdir -p /var/lib/nnm \
    && chown nnm:nnm /var/lib/nnm
USER 10001:10001
WORKDIR /home/nnm
ENV NNM_DATA_DIR=/var/lib/nnm \
    NNM_DEVICE=cuda

# Liveness from the worker's heartbeat file, not through Redis (nnm/service/worker/liveness.py).
HEALTHCHECK --interval=60s --timeout=20s --start-period=60s --retries=3 \
    CMD ["python", "-m", "nnm.service.worker.liveness", "--max-age", "120"]

# SIGTERM (docker stop, pod deletion): the running job's training process is stopped and the job is
# handed back to the queue within seconds, to resume from its last uploaded checkpoint on the next
# worker: Celery's warm shutdown waits for that hand-back, not for the job to finish.
# One job per GPU, no prefetching (a prefetched message would wait behind a days-long job).
CMD ["celery", "-A", "nnm.service.worker.celery_app", "worker", "-Q", "gpu", "--concurrency", "1", \
     "--prefetch-multiplier", "1", "-n", "gpu@%h", "--loglevel", "INFO"]
