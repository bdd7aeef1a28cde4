# syntax=docker/dockerfile:1
# One image for the three parts of ISDR on Kubernetes - the receiver (`isdr scp`), the operator
# (`isdr operator`) and the inference Jobs (`isdr job`) - and for `isdr run` outside a cluster.
#
#   docker build -t isdr:0.1.0 .
#   docker run --rm isdr:0.1.0 --help
#
# The build context is an allow-list (.dockerignore): pyproject.toml, README.md, the Python
# package(s) and crds/. tests/unit/test_dockerfile.py checks this file, as far as it can be
# checked without a Docker engine.

# --- builder: a wheel of the project, installed with its runtime dependencies into a venv ----
FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY . .
# No extras: the test dependencies stay out of the image.
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv /opt/isdr/venv \
 && /opt/isdr/venv/bin/pip install /dist/isdr-*.whl

# --- runtime ----------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="isdr" \
      org.opencontainers.image.description="ISDR - InferenceServer DICOM Relay: DICOM in, AI inference, DICOM out" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric user, so that Kubernetes can verify runAsNonRoot (the chart runs as 10001 too).
RUN groupadd --system --gid 10001 isdr \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin isdr
COPY --from=builder /opt/isdr/venv /opt/isdr/venv
# The CustomResourceDefinitions: the Fingerprint schema is read from here at run time
# (relay/fingerprints/schema.py, ISDR_CRDS_DIR).
COPY crds/ /opt/isdr/crds/
ENV PATH=/opt/isdr/venv/bin:$PATH \
    ISDR_CRDS_DIR=/opt/isdr/crds \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Writable in the container and, on Kubernetes, an emptyDir (the root file system is read-only).
WORKDIR /tmp
USER 10001:10001
# The DICOM receiver (SCP_PORT). No HEALTHCHECK: Kubernetes probes the port.
EXPOSE 11112
ENTRYPOINT ["isdr"]
CMD ["--help"]
