# One image for both roles: `coordinator ...` or `worker ...` (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY common common
COPY coordinator coordinator
COPY worker worker
# A plain (not editable) install: the embedded MNIST goes into site-packages with the code; the plot
# extra lets `coordinator report` draw inside the container.
RUN pip install ".[plot]" \
    && useradd --create-home --uid 10001 scatterprop \
    && mkdir /runs \
    && chown scatterprop /runs

USER scatterprop
# A fresh named volume mounted here copies this directory's owner, so the non-root user can write runs.
WORKDIR /runs
EXPOSE 5555 5556
