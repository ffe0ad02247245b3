# xMGIE service image: API, workers, beat and migrations share it; the command picks the role.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    XMGIE_DATA_DIR=/data \
    XMGIE_CACHE_DIR=/models/cache

WORKDIR /app
# torch first and pinned: the CUDA build from PyPI serves GPU workers and runs on CPU elsewhere.
RUN pip install torch==2.13.0
COPY pyproject.toml README.md alembic.ini ./
COPY xmgie ./xmgie
COPY api ./api
COPY workers ./workers
COPY migrations ./migrations
COPY examples ./examples
RUN pip install .

# Model directories are mounted read-only at /models; nothing is downloaded at run time.
VOLUME ["/models", "/data"]
EXPOSE 8000
CMD ["xmgie", "api", "--host", "0.0.0.0", "--port", "8000"]
