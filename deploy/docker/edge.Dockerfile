# syntax=docker/dockerfile:1.7
# fedge edge agent: `fedge edge run` (Flower SuperNode + ingest) and `fedge edge predict`. No Ray.
#
# Multi-arch: build for x86 servers and arm64 boards (Raspberry Pi 4/5, Jetson in CPU mode) in one go:
#   docker buildx build --platform linux/amd64,linux/arm64 -f deploy/docker/edge.Dockerfile -t fedge-edge:0.1.0 .
# Torch is the CPU build on both: on amd64 PyPI's torch==2.13.0 is the multi-GB CUDA build, so it comes from the
# PyTorch CPU index; on arm64 PyPI's wheel is already CPU-only. Everything else is pinned by constraints.txt.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TARGETARCH
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/fedge
ENV PATH=/opt/fedge/bin:$PATH
WORKDIR /src
COPY pyproject.toml setup.py constraints.txt README.md ./
# torch first, the CPU build for this architecture (the constraint torch==2.13.0 also admits 2.13.0+cpu)
RUN if [ "$TARGETARCH" = "arm64" ]; then \
        pip install -c constraints.txt torch==2.13.0; \
    else \
        pip install -c constraints.txt --index-url "$TORCH_CPU_INDEX" torch==2.13.0; \
    fi
# only the packages a device runs: fedge/, common/ and edge/ (cloud/ and Ray never enter the image)
COPY fedge ./fedge
COPY common ./common
COPY edge ./edge
RUN pip install -c constraints.txt ".[edge]" \
 && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('ray') is not None)" \
 && fedge edge --help > /dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="fedge-edge" \
      org.opencontainers.image.description="fedge edge agent: Flower SuperNode, ingest, sharded ONNX inference"
# libgomp: torch/onnxruntime OpenMP runtime; tini: reaps the clientapp processes the SuperNode spawns
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/fedge --create-home --shell /usr/sbin/nologin fedge
COPY --from=build /opt/fedge /opt/fedge
ENV PATH=/opt/fedge/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=2 \
    FLWR_HOME=/var/lib/fedge/flwr \
    FEDGE_STORE=/var/lib/fedge/store
USER fedge
WORKDIR /var/lib/fedge
# the sample store and the shard cache live here: mount a volume to keep them across restarts
VOLUME ["/var/lib/fedge"]
ENTRYPOINT ["/usr/bin/tini", "--", "fedge"]
CMD ["edge", "--help"]
