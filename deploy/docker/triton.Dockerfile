# syntax=docker/dockerfile:1.7
# Triton for shoprec: NVIDIA's container with shoprec's python-backend code.
#
#   docker build -f deploy/docker/triton.Dockerfile \
#     -t registry.example.com/shop/shoprec-triton:0.1.0-24.10 .
#
# Release 24.10 is Triton 2.51, the server the project runs locally (nvidia-pytriton
# 0.7.0 ships 2.51 too), so the model repository behaves the same on a laptop's CPU and
# on a GPU node.  The models (model_repo/*/<version>/model.py) are thin: they import
# `ranking` and `features` (and `shoprec` for the settings), so those must be importable
# by the python backend's stub processes.  How:
#
# * The NVIDIA image's Python is 3.10; shoprec requires 3.11.  Ubuntu 22.04 (the
#   image's OS) packages python3.11; shoprec and its pinned dependencies go into a
#   3.11 virtualenv at /opt/shoprec/venv.
# * The python backend's stub embeds the interpreter it was built for (3.10 here).
#   nvidia-pytriton, one of shoprec's pinned dependencies, ships the stub of the same
#   Triton release built for 3.11: it replaces the image's stub as a symlink, so its
#   $ORIGIN RPATH still finds the CUDA runtime it links (in the wheel's
#   nvidia_pytriton.libs); a copy fails to start (checked with the wheel here).
# * The stub does not read PYTHONPATH (it starts Python isolated; measured, see
#   ../shared/notes/triton-on-cpu.md): it takes the first `python3` on PATH and that
#   virtualenv's site-packages.  So the venv's bin goes first on PATH, and `ranking`,
#   `features` and `shoprec` are imported from the installed package, not from a path.
#
# torch from PyPI (pinned in constraints.txt) is a CUDA 13 build: GPU nodes need an
# NVIDIA driver that supports CUDA 13 (>= 580).  For older drivers pass
# --build-arg TORCH_INDEX_URL=<PyTorch's wheel index for your CUDA, e.g. cu126>.
ARG TRITON_VERSION=24.10
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3
ARG TORCH_INDEX_URL=""
USER 0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive
# Ubuntu's python3.11 for the image's release; apt versions not pinned (see shoprec.Dockerfile).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv libpython3.11 \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/shoprec/venv
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
RUN if [ -n "${TORCH_INDEX_URL}" ]; then \
        /opt/shoprec/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" \
            "$(grep -E '^torch==' constraints.txt)"; \
    fi \
 && /opt/shoprec/venv/bin/pip install -c constraints.txt .
COPY . .
RUN /opt/shoprec/venv/bin/pip install -c constraints.txt --no-deps --force-reinstall . \
 && STUB="$(/opt/shoprec/venv/bin/python -c 'import importlib.util as u; print(u.find_spec("pytriton").submodule_search_locations[0])')/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub" \
 && test -x "${STUB}" \
 && ln -sf "${STUB}" /opt/tritonserver/backends/python/triton_python_backend_stub \
 && /opt/shoprec/venv/bin/python -c "import ranking.triton_model, features.connection, shoprec.settings" \
 && rm -rf /src
WORKDIR /opt/tritonserver
# Nothing is fetched at run time: the MiniLM weights ship inside a wheel.
ENV PATH=/opt/shoprec/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
# The image's unprivileged user (triton-server); numeric so that Kubernetes can check
# runAsNonRoot.
USER 1000
# 8000 HTTP (health, model control), 8001 gRPC (inference), 8002 Prometheus metrics.
EXPOSE 8000 8001 8002
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh"]
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit", "--load-model=*"]
