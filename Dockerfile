# Two images from one file, both running the README's own make targets (make venv / build / serve):
#   serve    the API alone: no TensorFlow, no dev tools (the service embeds with numpy)
#   indexer  generates, trains and indexes (`make build`): with TensorFlow for the presets that train
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
ENV IMGSEARCH_HOST=0.0.0.0 \
    IMGSEARCH_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD [".venv/bin/python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["make", "serve"]

# After serve: a builder without BuildKit builds every stage before its target.
FROM base AS indexer
RUN make venv EXTRAS=train
CMD ["make", "build"]
