# syntax=docker/dockerfile:1
# A Celery worker without a GPU. It consumes the `cpu` queue (evaluation) and also the `gpu` queue
# (training stages): on a host with no GPU worker it is the only one, and training jobs would otherwise
# wait forever. Where a GPU worker runs, jobs on `gpu` go to whichever worker is free first; run this
# worker with `-Q cpu` (override the command) to keep training off the CPU.
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
RUN pip install '.[faiss,small-data,service]' \
    && rm -rf /opt/nnm/build

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/nnm --shell /usr/sbin/nologin nnm \
    && mkdir -p /var/lib/nnm \
    && chown nnm:nnm /var/lib/nnm
USER nnm
WORKDIR /home/nnm
ENV NNM_DATA_DIR=/var/lib/nnm

# The worker's main process answers control messages while its pool process runs a job, so the
# ping works during long training. -d names this node (-n cpu@%h, %h = the container's hostname).
HEALTHCHECK --interval=60s --timeout=20s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "celery -A nnm.service.celery_app inspect ping -d cpu@$HOSTNAME -t 10"]

# One job at a time (training runs in a child process that uses every core), no prefetching.
CMD ["celery", "-A", "nnm.service.celery_app", "worker", "-Q", "cpu,gpu", "--concurrency", "1", \
     "--prefetch-multiplier", "1", "-n", "cpu@%h", "--loglevel", "INFO"]
