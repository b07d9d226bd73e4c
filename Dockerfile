# syntax=docker/dockerfile:1
# The gpupool image: one image, two commands (`gpupool operator`, `gpupool gateway`).
# Build from the repository root:  docker build -t gpupool/gpupool:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the package and its pinned dependencies into a virtualenv ----------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/gpupool
ENV PATH=/opt/gpupool/bin:$PATH
WORKDIR /src
# Only the project's own files that the package build reads (see .dockerignore).
COPY pyproject.toml README.md ./
COPY operator/ operator/
# The same install step as the README: `pip install .` (dependencies pinned in pyproject.toml).
RUN pip install . \
 && test -x /opt/gpupool/bin/gpupool \
 && python -c "import gpupool.cli, kopf"

# --- runtime: the virtualenv only, as a non-root user --------------------------------------
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/gpupool/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 gpupool \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gpupool
COPY --from=build /opt/gpupool /opt/gpupool
# Numeric, so Kubernetes' runAsNonRoot can verify it; the chart runs it with a read-only root
# filesystem and an emptyDir on /tmp.
USER 10001:10001
WORKDIR /tmp
# 8080: kopf liveness (operator) or HTTP (gateway); 9090: Prometheus /metrics.
EXPOSE 8080 9090
ENTRYPOINT ["gpupool"]
CMD ["operator"]
