# The bidder's container image (docs/operations.md#container-image).
# Build stage: compiles the Cython extensions into a wheel, with the wheels of the runtime dependencies.
# Runtime stage: those wheels only (no torch, no compiler), a non-root user, the config file, a health check.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-bookworm AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY bidder ./bidder
COPY train ./train
COPY bench ./bench
# the runtime install only: `pip wheel .` resolves the dependencies, not the train, bench or dev extras
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 bidder \
 && useradd --system --uid 10001 --gid bidder --home-dir /var/lib/bidder --create-home --shell /usr/sbin/nologin bidder
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels bidder==0.1.0 \
 && rm -rf /wheels
COPY deploy/bidder.toml /etc/bidder/bidder.toml
USER 10001:10001
# the event log and the notice store go under here when configured (a volume in production)
WORKDIR /var/lib/bidder
EXPOSE 8080 9464
# SIGTERM drains: the listener closes, in-flight requests finish (drain-timeout in the config), workers exit 0
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["bidder", "ready", "--config", "/etc/bidder/bidder.toml"]
ENTRYPOINT ["bidder", "serve", "--config", "/etc/bidder/bidder.toml"]
