# The image runs the README's own commands (make venv / make build / make serve), so the two cannot drift.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends make libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 app && mkdir /artifacts && chown app:app /artifacts
WORKDIR /app
COPY --chown=app:app pyproject.toml constraints.txt Makefile README.md ./
COPY --chown=app:app app ./app
COPY --chown=app:app dataset ./dataset
COPY --chown=app:app evaluation ./evaluation
COPY --chown=app:app features ./features
COPY --chown=app:app indexer ./indexer
COPY --chown=app:app model ./model
COPY --chown=app:app pipeline ./pipeline
COPY --chown=app:app scripts ./scripts
COPY --chown=app:app verification ./verification
USER app
RUN make venv

ENV IMGSEARCH_HOST=0.0.0.0 \
    IMGSEARCH_PORT=8000 \
    IMGSEARCH_ARTIFACTS=/artifacts
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD [".venv/bin/python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["make", "serve"]
