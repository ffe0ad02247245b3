"""The HTTP API of the job service (FastAPI); thin, calls :mod:`xmgie.jobs`."""
