# The fedmoe image (CPU): compose.yaml runs the coordinator service and every enterprise agent
# from it. Build: `docker compose build` (or `docker build -t fedmoe:local .`).
FROM python:3.11-slim

# The in-image user's ids. compose.yaml passes the host user's (deploy/setup.sh writes them to
# .env), so that the private keys bind-mounted from deploy/ stay readable at mode 0600.
ARG FEDMOE_UID=10001
ARG FEDMOE_GID=10001

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

# torch first, explicitly the CPU build: from PyPI, torch==2.13.0 drags in gigabytes of CUDA wheels.
# The project's own `torch==2.13.0` is then already satisfied by 2.13.0+cpu.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Editable install from the source tree kept at /app, owned by root and read-only to the service
# user. The coordinator submits every run with `flwr run <APP_DIR>`: the Flower app in
# coordinator/flower_app/, which ships inside fedmoe (checked below).
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir -e . \
 && python -m compileall -q /app \
 && python -c "from fedmoe.coordinator.service.superlink import APP_DIR; assert (APP_DIR / 'pyproject.toml').is_file(), APP_DIR"

# Non-root service user. /var/lib/fedmoe is where compose mounts each service's named volume
# (coordinator storage, agent ledger and state): a fresh volume takes this folder's owner.
RUN test "$FEDMOE_UID" != 0 || { echo "FEDMOE_UID must not be 0 (root)" >&2; exit 1; } \
 && (getent group "$FEDMOE_GID" >/dev/null || groupadd --gid "$FEDMOE_GID" fedmoe) \
 && useradd --non-unique --uid "$FEDMOE_UID" --gid "$FEDMOE_GID" --create-home --home-dir /home/fedmoe \
      --shell /usr/sbin/nologin fedmoe \
 && mkdir -p /var/lib/fedmoe /etc/fedmoe \
 && chown "$FEDMOE_UID:$FEDMOE_GID" /var/lib/fedmoe \
 && chmod 0700 /var/lib/fedmoe
USER fedmoe

# 9092: the agents' endpoint (TLS, registered node keys only); 9091: the admin API (TLS, tokens).
EXPOSE 9092 9091
CMD ["fedmoe", "--help"]
