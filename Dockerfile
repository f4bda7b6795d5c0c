# Two images from one file, both running the README's own make targets (make venv / build / serve):
#   serve    the API alone: no TensorFlow, no dev tools (the service embeds with numpy)
#   indexer  generates, trains and indexes (`make build`): the default trains in numpy; built with
#            EXTRAS=train it has TensorFlow too, for the `paper` presets (a Keras Siamese network)
# The base image is a build argument: any Debian-like image with Python 3.11 (and its venv module).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
RUN apt-get update \
    && apt-get install -y --no-install-recommends make libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
# The app user owns /app (the venv is created there) and /artifacts (the shared volume).
RUN useradd --create-home --uid 10001 app \
    && mkdir -p /app /artifacts \
    && chown app:app /app /artifacts
WORKDIR /app
USER app
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IMGSEARCH_ARTIFACTS=/artifacts
COPY --chown=app:app pyproject.toml constraints.txt Makefile README.md ./
COPY --chown=app:app common ./common
COPY --chown=app:app dataset ./dataset
COPY --chown=app:app features ./features
COPY --chown=app:app model ./model
COPY --chown=app:app indexer ./indexer
COPY --chown=app:app retrieval ./retrieval
COPY --chown=app:app app ./app
COPY --chown=app:app evaluation ./evaluation
COPY --chown=app:app cli ./cli

FROM base AS serve
RUN make venv EXTRAS=
# It listens on every interface of the container: with no IMGSEARCH_ADMIN_KEY, the admin endpoints
# then refuse every call (app/api/deps.py); compose publishes the port on 127.0.0.1 only.
ENV IMGSEARCH_HOST=0.0.0.0 \
    IMGSEARCH_PORT=8000
EXPOSE 8000
# Healthy while ready (an index loaded), not merely up; not ready for IMGSEARCH_HEALTH_RESTART_S in a
# row (default 300), the check stops the container's init so that its restart policy restarts it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD [".venv/bin/python", "-m", "cli.healthcheck"]
CMD ["make", "serve"]

# After serve: a builder without BuildKit builds every stage before its target.
FROM base AS indexer
ARG EXTRAS=""
RUN make venv EXTRAS=${EXTRAS}
CMD ["make", "build"]
