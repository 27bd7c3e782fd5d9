# RIDE Serve images (see deploy/README.md).
#
#   docker build --target serve -t ride-serve:gpu .                    # onnxruntime-gpu + CUDA/cuDNN from pip, no torch
#   docker build --target serve --build-arg ORT=cpu -t ride-serve:cpu .  # CPU-only onnxruntime
#   docker build --target train -t ride-serve:train .                  # torch, training and export
#
# Each image's virtual environment is built in its own builder stage and copied into a clean stage, so the
# final images hold no pip cache, no source tree and no build tools.
#
# No `# syntax=` line: everything used here (RUN --mount of type cache, secret and tmpfs) is in the Dockerfile
# frontend built into BuildKit and Podman, so a build needs no registry for the frontend.
#
# Behind a TLS-inspecting proxy, pass its CA bundle as a build secret; pip then trusts it in addition to its own
# roots, and the bundle never lands in an image layer:
#   docker build --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt ...
# PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS and PIP_TRUSTED_HOST build arguments reach pip in the
# builder stages only, e.g.
#   --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu   # the CPU build of torch for `train`

# The tag says what it is; the digest makes the build reproducible. Override both at once if the digest ages out.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
# Where the pip CUDA 13 wheels put their libraries (the "cu13" folder holds cudart, cublas, cufft, curand, nvrtc and
# nvJitLink; cuDNN keeps a folder of its own). The Python minor version is the base image's.
ARG NVIDIA_LIBS=/opt/venv/lib/python3.11/site-packages/nvidia

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# One fixed unprivileged account for every image; its home holds caches (the train image mounts ~/.cache).
RUN groupadd --system --gid 10001 ride \
    && useradd --system --uid 10001 --gid ride --create-home --home-dir /home/ride --shell /usr/sbin/nologin ride

# The project's source, as pip needs it to build the ride-serve wheel.
FROM base AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cascade/ cascade/
COPY training/ training/
COPY export/ export/
COPY service/ service/

# `./[extras]` rather than `.[extras]`: the same install, spelled so that hadolint sees a local path (DL3013).
FROM source AS serve-venv
# gpu: onnxruntime-gpu with the CUDA and cuDNN libraries from its pip extras (versions pinned in pyproject.toml);
# cpu: the CPU-only onnxruntime. For gpu, the libraries the serve image's LD_LIBRARY_PATH names must be where it
# says and readable by the server's unprivileged user, or the build stops here rather than the server falling
# back to the CPU (RIDE_PROVIDER=auto) or refusing to start (cuda) on a GPU host.
ARG ORT=gpu
ARG NVIDIA_LIBS
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip_ca \
    --mount=type=tmpfs,target=/run/pip-ca \
    case "${ORT}" in gpu|cpu) ;; *) echo "ORT must be gpu or cpu, not '${ORT}'" >&2; exit 1 ;; esac \
    && python -m venv "${VIRTUAL_ENV}" \
    && if [ -s /run/secrets/pip_ca ]; then \
        cat "$(python -c 'from pip._vendor import certifi; print(certifi.where())')" /run/secrets/pip_ca \
            > /run/pip-ca/ca.pem && export PIP_CERT=/run/pip-ca/ca.pem; fi \
    && pip install "./[serve,${ORT}]" \
    && if [ "${ORT}" = gpu ]; then \
        chmod -R a+rX "${NVIDIA_LIBS}" \
        && for lib in cu13/lib/libcudart.so.13 cu13/lib/libcublasLt.so.13 cu13/lib/libcublas.so.13 \
            cu13/lib/libcufft.so.12 cu13/lib/libcurand.so.10 cu13/lib/libnvrtc.so.13 cudnn/lib/libcudnn.so.9; do \
            test -r "${NVIDIA_LIBS}/${lib}" || { echo "onnxruntime-gpu's ${lib} is not in ${NVIDIA_LIBS}" >&2; exit 1; }; \
        done; fi

FROM source AS train-venv
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip_ca \
    --mount=type=tmpfs,target=/run/pip-ca \
    python -m venv "${VIRTUAL_ENV}" \
    && if [ -s /run/secrets/pip_ca ]; then \
        cat "$(python -c 'from pip._vendor import certifi; print(certifi.where())')" /run/secrets/pip_ca \
            > /run/pip-ca/ca.pem && export PIP_CERT=/run/pip-ca/ca.pem; fi \
    && pip install "./[train]"

# ---------------------------------------------------------------------------------------------------------------
# train: `docker compose run --rm train python -m training.run ...` (compose mounts configs, data, runs, models).
# ---------------------------------------------------------------------------------------------------------------
FROM base AS train
COPY --from=train-venv /opt/venv /opt/venv
WORKDIR /opt/ride
COPY configs/ configs/
ENV HOME=/home/ride \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
CMD ["python", "-m", "training.run", "--help"]

# ---------------------------------------------------------------------------------------------------------------
# serve (the default target, last in the file): the HTTP server with the bundled model.
# ---------------------------------------------------------------------------------------------------------------
FROM base AS serve
ARG ORT=gpu
ARG NVIDIA_LIBS
LABEL org.opencontainers.image.title="RIDE Serve" \
      org.opencontainers.image.description="RIDE early-exit expert cascade served with onnxruntime" \
      org.opencontainers.image.licenses="MIT" \
      io.ride-serve.onnxruntime="${ORT}"
COPY --from=serve-venv /opt/venv /opt/venv
# The bundled default model; a volume mounted elsewhere plus RIDE_MODEL_DIR (or one mounted over this path)
# replaces it. Owned by root and read-only to the server's user.
COPY models/cifar10-lt-ride4/ /opt/ride/models/cifar10-lt-ride4/
# The container toolkit reads NVIDIA_DRIVER_CAPABILITIES to inject the CUDA driver; harmless without a GPU.
# LD_LIBRARY_PATH: onnxruntime's CUDA provider finds the pip CUDA 13 and cuDNN libraries whether or not its
# preload_dlls() knows their folders (only recent onnxruntime releases know the CUDA 13 layout); the folders do
# not exist in the cpu image, where the variable changes nothing.
ENV RIDE_MODEL_DIR=/opt/ride/models/cifar10-lt-ride4 \
    RIDE_HOST=0.0.0.0 \
    RIDE_PORT=8000 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=${NVIDIA_LIBS}/cu13/lib:${NVIDIA_LIBS}/cudnn/lib
WORKDIR /opt/ride
USER 10001:10001
EXPOSE 8000
# No curl in slim images: Python's urllib does the probe. /readyz answers 200 only once the model is warm,
# and urlopen raises on 503 or no answer, which exits non-zero. The start period covers CUDA start-up.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('RIDE_PORT', '8000') + '/readyz', timeout=2)"]
# Exec form: the server is PID 1 and receives SIGTERM itself, so `docker stop` drains requests in flight.
ENTRYPOINT ["python", "-m", "service"]
