"""The periodic schedule of ``xmgie beat``: the reconciler, every minute, on the ``default`` queue."""

from __future__ import annotations

from typing import Any

from xmgie.jobs.dispatch import DEFAULT_QUEUE, RECONCILE_TASK

RECONCILE_EVERY_SECONDS = 60.0


def beat_schedule() -> dict[str, dict[str, Any]]:
    """Celery's ``beat_schedule``: ``xmgie.reconcile`` every ``RECONCILE_EVERY_SECONDS``."""
    return {
        "reconcile": {
            "task": RECONCILE_TASK,
            "schedule": RECONCILE_EVERY_SECONDS,
            "options": {"queue": DEFAULT_QUEUE, "expires": RECONCILE_EVERY_SECONDS},
        }
    }
