"""The periodic schedule of ``xmgie beat``: the reconciler and the schedule dispatcher, on the ``default`` queue."""

from __future__ import annotations

from typing import Any

from xmgie.jobs.dispatch import DEFAULT_QUEUE, DISPATCH_SCHEDULES_TASK, RECONCILE_TASK
from xmgie.jobs.settings import Settings


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery's ``beat_schedule``: ``xmgie.reconcile`` every ``settings.reconcile_seconds`` and
    ``xmgie.dispatch_schedules`` every ``settings.schedule_tick_seconds``; a tick not taken before the next one
    is due expires, so a stopped worker does not come back to a pile of ticks.
    """
    return {
        "reconcile": {
            "task": RECONCILE_TASK,
            "schedule": settings.reconcile_seconds,
            "options": {"queue": DEFAULT_QUEUE, "expires": settings.reconcile_seconds},
        },
        "dispatch-schedules": {
            "task": DISPATCH_SCHEDULES_TASK,
            "schedule": settings.schedule_tick_seconds,
            "options": {"queue": DEFAULT_QUEUE, "expires": max(settings.schedule_tick_seconds, 1.0)},
        },
    }
