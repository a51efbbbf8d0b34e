# Flowerpot's two images from one file, sharing one base:
#   server: Flower and the server code, no torch and no client code; small enough to push to a VM.
#   client: PyTorch (CPU builds by default), the data sets and the client code.
# Compose picks one with build.target; by hand:
#   docker build --target server -t flowerpot-server .
#   docker build --target client -t flowerpot-client .

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# A non-root user owning the mount points, so that fresh named volumes get its ownership.
RUN useradd --create-home --uid 10001 flowerpot \
    && mkdir -p /data /results /certs /privacy \
    && chown flowerpot:flowerpot /data /results /certs /privacy
WORKDIR /app


FROM base AS server
# Dependencies first: a code change does not reinstall them.
COPY server/requirements.txt /tmp/requirements/server/requirements.txt
RUN pip install -r /tmp/requirements/server/requirements.txt
COPY flowerpot/ flowerpot/
COPY shared/ shared/
COPY server/ server/
USER flowerpot
ENV RESULTS_DIR=/results SERVER_LISTEN_ADDRESS=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["python", "-m", "flowerpot"]
CMD ["server"]


# Your own task (docs/own-model.md), baked in for machines where it is not mounted (EC2 sites,
# Swarm nodes): --build-arg TASK_DIR=tasks/my_task, run with TASK_DIR=/task; its requirements.txt
# is installed in the client stage. Only tasks/ and examples/ are in the build context (see
# .dockerignore), so a folder elsewhere (Compose passes .env's TASK_DIR, say ./my_task, which it
# mounts instead) leaves /task empty and says so, rather than failing the build.
FROM base AS task
ARG TASK_DIR=""
COPY tasks* /sources/tasks/
COPY examples/ /sources/examples/
RUN folder="${TASK_DIR#./}"; folder="${folder%/}"; mkdir /task; \
    case "$folder" in \
      "" | client/tasks) ;; \
      tasks/?* | examples/?*) \
        if [ ! -d "/sources/$folder" ]; then \
          echo "error: TASK_DIR=$TASK_DIR: no such folder in the checkout: correct TASK_DIR" >&2; exit 1; \
        fi; \
        cp -r "/sources/$folder/." /task/; echo "TASK_DIR=$TASK_DIR baked into the image at /task" ;; \
      *) echo "TASK_DIR=$TASK_DIR is not under tasks/ or examples/: not baked into the image" \
              "(Compose mounts it; to bake it in, move it to tasks/)" ;; \
    esac


FROM base AS client
# Where torch and torchvision come from. The default is PyTorch's CPU-only index (a small image);
# client/wheels/ is searched first, for machines that have the wheels on disk.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_PACKAGES="torch==2.14.1 torchvision==0.29.1"
ENV OMP_NUM_THREADS=1
# torch in a layer of its own, then the rest: a code change reinstalls nothing.
RUN --mount=type=bind,source=client/wheels,target=/wheels \
    pip install --find-links /wheels --index-url "$TORCH_INDEX_URL" $TORCH_PACKAGES
COPY server/requirements.txt /tmp/requirements/server/requirements.txt
COPY client/requirements.txt /tmp/requirements/client/requirements.txt
RUN pip install -r /tmp/requirements/client/requirements.txt
COPY flowerpot/ flowerpot/
COPY shared/ shared/
# The code only: client/wheels/ is in the build context for the torch layer, not for the image.
COPY client/*.py client/
COPY client/data/ client/data/
COPY client/tasks/ client/tasks/
COPY client/privacy/ client/privacy/
COPY --from=task /task/ /task/
RUN if [ -f /task/requirements.txt ]; then pip install -r /task/requirements.txt; fi
USER flowerpot
ENV DATA_DIR=/data RESULTS_DIR=/results SERVER_ADDRESS=server:8080
ENTRYPOINT ["python", "-m", "flowerpot"]
CMD ["client"]
