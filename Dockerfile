# The mvllm router: `docker build -t mvllm .` then
#   docker run -p 8888:8888 -v $PWD/servers.toml:/app/servers.toml:ro mvllm
# Without a mounted servers.toml it starts the built-in demo (simulated engines in the container).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package needs, so edits to tests or docs do not invalidate this layer.
COPY pyproject.toml README.md ./
COPY mvllm ./mvllm
RUN pip install . \
    && rm -rf /src \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin mvllm \
    && mkdir -p /app && chown mvllm /app

USER mvllm
WORKDIR /app
EXPOSE 8888
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8888/health', timeout=2)"]
# ./servers.toml is looked up in /app; 0.0.0.0 so the published port reaches it.
CMD ["mvllm", "run", "--console", "--host", "0.0.0.0"]
