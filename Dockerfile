# The mvllm router: `docker build -t mvllm .` then, with servers.toml in ./config:
#   docker run -p 8888:8888 -v $PWD/config:/config:ro mvllm \
#     mvllm run --console --host 0.0.0.0 --config /config/servers.toml
# Mount the directory, not the file: an editor that saves by renaming a new file over the old one
# would leave a single-file mount pointing at the old inode, and the router would miss the edit.
# Without a config it starts the built-in demo (simulated engines and an agent in the container).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Dependencies first, in a layer of their own: it is rebuilt only when pyproject.toml changes, not
# on every code change. An empty package stands in for the code while they install.
COPY pyproject.toml README.md ./
RUN mkdir mvllm && touch mvllm/__init__.py \
    && pip install '.[fast]' && pip uninstall -y mvllm && rm -rf mvllm
COPY mvllm ./mvllm
RUN pip install --no-deps . \
    && rm -rf /src \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin mvllm \
    && mkdir -p /app && chown mvllm /app

USER mvllm
WORKDIR /app
EXPOSE 8888
# /ready answers 200 only while at least one node has been seen healthy (/health is liveness).
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8888/ready', timeout=2)"]
# ./servers.toml is looked up in /app; 0.0.0.0 so the published port reaches it.
CMD ["mvllm", "run", "--console", "--host", "0.0.0.0"]
