"""Publishing work to the Celery workers by task name, so that the API never imports ``workers``.

The queue carries only item ids, in micro-batches; the database stays the source of truth (a lost or duplicated
message is harmless: the reconciler publishes again, ``claim_item`` lets one delivery through).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any
from uuid import UUID

EDIT_ITEMS_TASK = "xmgie.edit_items"
"""Edits a micro-batch of items: one argument, the list of item ids as strings."""
RECONCILE_TASK = "xmgie.reconcile"
"""Takes back expired leases and publishes queued items whose message may be lost."""
GPU_QUEUE = "gpu"
"""The queue of edits, consumed by the model workers."""
DEFAULT_QUEUE = "default"
"""The queue of bookkeeping (the reconciler)."""
TASK_ROUTES: dict[str, dict[str, str]] = {
    EDIT_ITEMS_TASK: {"queue": GPU_QUEUE},
    RECONCILE_TASK: {"queue": DEFAULT_QUEUE},
}
MIN_VISIBILITY_TIMEOUT_SECONDS = 60


def visibility_timeout_seconds(lease_seconds: int) -> int:
    """Redis' redelivery delay of an unacknowledged message: twice the lease, longer than any task may run.

    A task works on its items under leases of ``lease_seconds``; redelivering its message sooner would only add a
    duplicate delivery while the first one is still running.
    """
    return max(2 * lease_seconds, MIN_VISIBILITY_TIMEOUT_SECONDS)


def micro_batches(item_ids: Iterable[UUID | str], size: int) -> list[list[str]]:
    """``item_ids`` as strings, in order, cut into lists of at most ``size`` (at least 1)."""
    ids = [str(item_id) for item_id in item_ids]
    size = max(1, size)
    return [ids[start : start + size] for start in range(0, len(ids), size)]


def celery_dispatcher(
    broker_url: str, micro_batch_size: int = 1, lease_seconds: int = 600
) -> Callable[[Sequence[UUID]], None]:
    """A ``dispatch(item_ids)`` publishing ``xmgie.edit_items`` messages to the ``gpu`` queue of ``broker_url``.

    Call it only after the items' rows are committed. The Celery client is created here, once, and connects on
    the first publish.
    """
    from celery import Celery

    client = Celery("xmgie-dispatch", broker=broker_url, set_as_current=False)
    client.conf.update(
        task_routes=TASK_ROUTES,
        broker_transport_options={"visibility_timeout": visibility_timeout_seconds(lease_seconds)},
        broker_connection_retry_on_startup=True,
    )

    def dispatch(item_ids: Sequence[UUID]) -> None:
        """Publish the items in micro-batches of ``micro_batch_size``."""
        for batch in micro_batches(item_ids, micro_batch_size):
            send(client, batch)

    return dispatch


def send(client: Any, batch: list[str]) -> None:
    """Publish one ``xmgie.edit_items`` message for ``batch`` on the ``gpu`` queue of ``client`` (a Celery app)."""
    client.send_task(EDIT_ITEMS_TASK, args=[batch], queue=GPU_QUEUE)
