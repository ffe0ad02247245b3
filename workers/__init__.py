"""Celery workers of the job service; thin, call :mod:`xmgie`."""
