# FuseMyCells Grand Challenge algorithm image (inference only; weights from resources/).
#
# Versions, and why:
# * onnxruntime-gpu 1.31.1 (requirements.txt) is built against CUDA 13.x and cuDNN 9.x.
# * torch 2.13.0 from the PyTorch cu130 index is built against CUDA 13.0 and installs, as pip
#   packages (nvidia-*-cu13), the CUDA 13 runtime, cuBLAS and cuDNN 9. onnxruntime loads these same
#   libraries (fusemycells/backends.py calls onnxruntime.preload_dlls()), so the image carries ONE
#   CUDA user space, matching both backends.
# * Base nvidia/cuda:13.0.1-base-ubuntu24.04 (pinned tag): small (no duplicate CUDA libraries). CUDA
#   13 needs a host driver >= 580; the image's cuda-compat libraries (/usr/local/cuda/compat) can
#   serve older R535/R570 data-centre drivers (the T4 of Grand Challenge) only where the container
#   runtime puts them on the library path, which recent NVIDIA container toolkits no longer do by
#   themselves (unverified on Grand Challenge: no GPU host was available to us). If CUDA cannot
#   start, both backends fall back to CPU, logged and in the report (with the driver version), and
#   the time budget degrades the output instead of failing.
# Grand Challenge runs linux/amd64 only; the issue asks for the platform to be explicit.
# hadolint ignore=DL3029
FROM --platform=linux/amd64 nvidia/cuda:13.0.1-base-ubuntu24.04

# The base image sets NVIDIA_REQUIRE_CUDA (cuda>=13.0 plus driver brands), and the NVIDIA container
# runtime refuses to START the container on a host whose driver is older. Grand Challenge hosts
# (T4, g4dn) may run such drivers; refusing would also kill the CPU fallback. With the check off the
# container always starts: CUDA runs where the driver (or cuda-compat) allows it, else both
# backends fall back to the CPU. The driver version is logged and in the report's policy section.
ENV NVIDIA_DISABLE_REQUIRE=1

# One malloc arena: glibc gives every thread that allocates (prefetch, concurrent CPU forwards, ONNX
# Runtime's pool) an arena of its own, and each keeps its freed blocks resident. Measured on the
# patch-stage benchmark with two concurrent CPU forwards: 133 MiB less peak RSS, time within noise.
ENV MALLOC_ARENA_MAX=1

# onnxruntime's telemetry writes a device id and a database under $HOME/.cache on import (1.31.1);
# inference.py sets this too, for runs outside the image.
ENV ORT_DISABLE_TELEMETRY=1

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's Python 3.12; the base image tag pins the release, apt keeps security fixes current.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && groupadd -r -g 1001 user && useradd -m --no-log-init -r -u 1001 -g user user

WORKDIR /opt/app

# CUDA build of the pinned torch first, then the rest of the pinned requirements (torch already met).
COPY requirements.txt /opt/app/
RUN python -m pip install --index-url https://download.pytorch.org/whl/cu130 torch==2.13.0 \
    && python -m pip install -r /opt/app/requirements.txt

COPY --chown=user:user inference.py /opt/app/
COPY --chown=user:user fusemycells /opt/app/fusemycells
COPY --chown=user:user resources /opt/app/resources

USER 1001:1001
ENTRYPOINT ["python", "inference.py"]
