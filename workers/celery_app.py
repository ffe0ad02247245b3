"""The Celery application of the workers, configured from ``xmgie.jobs.settings``.

Messages are acknowledged after their task ran (``task_acks_late``) and given back when the worker process dies
(``task_reject_on_worker_lost``); a worker prefetches one message at a time; Redis redelivers an unacknowledged
message only after ``visibility_timeout`` (twice the lease, longer than any task). Edits go to the ``gpu`` queue,
the reconciler to ``default``. Nothing heavy happens at import: the model is loaded by the first task of each
worker process (see ``workers.tasks``).
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from workers.beat import beat_schedule
from xmgie.jobs.dispatch import DEFAULT_QUEUE, GPU_QUEUE, TASK_ROUTES, visibility_timeout_seconds
from xmgie.jobs.settings import Settings, get_settings


def configure(app: Celery, settings: Settings) -> None:
    """Apply the processing rules (architecture §4.2) and the settings' broker to ``app``."""
    app.conf.update(
        broker_url=settings.broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": visibility_timeout_seconds(settings.lease_seconds)},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_queues=(Queue(GPU_QUEUE), Queue(DEFAULT_QUEUE)),
        task_default_queue=DEFAULT_QUEUE,
        task_routes=TASK_ROUTES,
        task_serializer="json",
        accept_content=["json"],
        beat_schedule=beat_schedule(settings),
        timezone="UTC",
        enable_utc=True,
    )


celery_app = Celery("xmgie", include=["workers.tasks"])
configure(celery_app, get_settings())
