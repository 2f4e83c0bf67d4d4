# syntax=docker/dockerfile:1.7
# fedge cloud side: Flower SuperLink, aggregator (ServerApp + Ray actor), Ray Train job, ShardServer (Ray Serve).
# Based on Ray's own image so that KubeRay, `ray up` and compose all run the exact Ray that flwr 1.42 pins.
#   docker build -f deploy/docker/cloud.Dockerfile -t fedge-cloud:0.1.0 .
#   docker build -f deploy/docker/cloud.Dockerfile --build-arg RAY_IMAGE=rayproject/ray:2.55.1-py311-gpu \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t fedge-cloud:0.1.0-gpu .
ARG RAY_IMAGE=rayproject/ray:2.55.1-py311
FROM ${RAY_IMAGE}
# CPU torch by default; the gpu overlay builds with a CUDA index and the -gpu Ray image
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /home/ray/fedge
COPY --chown=ray:users pyproject.toml setup.py constraints.txt README.md ./
RUN pip install -c constraints.txt --index-url "$TORCH_INDEX" torch==2.13.0
COPY --chown=ray:users fedge ./fedge
COPY --chown=ray:users common ./common
COPY --chown=ray:users edge ./edge
COPY --chown=ray:users cloud ./cloud
COPY --chown=ray:users simulations ./simulations
COPY --chown=ray:users deploy/export_base.py ./deploy/export_base.py
# The Flower app (FAB) is built from this directory by `flwr run`, so the tree stays in the image.
# ray==2.55.1 is already in the base image and pinned again by constraints.txt: pip keeps it.
RUN pip install -c constraints.txt -e ".[cloud]" \
 && python -c "import ray, flwr; assert ray.__version__ == '2.55.1', ray.__version__" \
 && fedge cloud --help > /dev/null
ENV FLWR_HOME=/home/ray/.flwr \
    RAY_USAGE_STATS_ENABLED=0
# 9093 SuperLink (Fleet/Control/Runtime APIs over HTTPS), 8000 Ray Serve (ShardServer), 6379 Ray GCS,
# 8265 Ray dashboard / job API, 10001 Ray client
EXPOSE 9093 8000 6379 8265 10001
CMD ["fedge", "cloud", "--help"]
