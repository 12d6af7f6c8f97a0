# syntax=docker/dockerfile:1.7
# The shoprec image: one image for `shoprec worker`, `shoprec learner`, `shoprec serve`
# and every other command of the CLI (the entrypoint is `shoprec`; the pod's args pick
# the command).  Build from the repository root:
#
#   docker build -f deploy/docker/shoprec.Dockerfile -t registry.example.com/shop/shoprec:0.1.0 .
#
# The dependencies are the ones `make install` gets: pyproject.toml with constraints.txt.
# torch is the biggest of them: pass --build-arg TORCH_INDEX_URL=<PyTorch's CPU-only wheel
# index> to install its CPU build (about 1.5 GB smaller; nothing in these processes
# needs CUDA: the math runs in Triton).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/shoprec/venv
ENV PATH=/opt/shoprec/venv/bin:${PATH}
WORKDIR /src
# Dependencies first, in their own layer, rebuilt only when the pins change: with only
# pyproject.toml present, `pip install .` installs every dependency and an empty package.
COPY pyproject.toml constraints.txt README.md ./
RUN if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --index-url "${TORCH_INDEX_URL}" "$(grep -E '^torch==' constraints.txt)"; \
    fi \
 && pip install -c constraints.txt .
COPY . .
RUN pip install -c constraints.txt --no-deps --force-reinstall . \
 && shoprec --help >/dev/null

FROM ${PYTHON_IMAGE}
# libgomp: OpenMP runtime of faiss-cpu and torch's CPU kernels.  Debian's version of the
# base image's release, not pinned (pins of apt versions break when the archive moves).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 shoprec \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/shoprec --create-home \
        --shell /usr/sbin/nologin shoprec
COPY --from=build /opt/shoprec/venv /opt/shoprec/venv
# The models of this release: the learner copies them into an empty model repository.
COPY model_repo /opt/shoprec/model_repo
# HOME and the working directory are emptyDir volumes in Kubernetes (read-only root);
# the MiniLM weights ship inside a wheel, so nothing is ever fetched from a hub.
ENV PATH=/opt/shoprec/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/shoprec \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
WORKDIR /var/lib/shoprec
USER 10001:10001
# 8080: pull API (`serve`); 9108: Prometheus /metrics of the worker and the learner.
EXPOSE 8080 9108
ENTRYPOINT ["shoprec"]
CMD ["worker"]
