"""Publishing work to the Celery workers by task name, so that the API never imports ``workers``.

The queue carries only item ids, in micro-batches; the database stays the source of truth (a lost or duplicated
message is harmless: the reconciler publishes again, ``claim_item`` lets one delivery through).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol
from uuid import UUID

EDIT_ITEMS_TASK = "xmgie.edit_items"
"""Edits a micro-batch of items: one argument, the list of item ids as strings."""
RECONCILE_TASK = "xmgie.reconcile"
"""Takes back expired leases and publishes queued items whose message may be lost."""
PUBLISH_EDITS_TASK = "xmgie.publish_edits"
"""Publishes ``xmgie.edit_items`` for many items: arguments, the item ids as strings and the micro-batch size."""
DIRECT_PUBLISH_MESSAGES = 32
"""A submission needing more edit messages than this sends one ``xmgie.publish_edits`` instead, so accepting a
job of 10,000 items costs one publish; a bookkeeping worker publishes the edits."""
DELIVER_WEBHOOK_TASK = "xmgie.deliver_webhook"
"""Makes one delivery attempt of a finished job's webhook: one argument, the job id as a string."""
DISPATCH_SCHEDULES_TASK = "xmgie.dispatch_schedules"
"""Finds the schedules with a due slot and creates one run per slot."""
START_RUN_TASK = "xmgie.start_run"
"""Lists a run's source and creates its job: one argument, the run id as a string."""
GPU_QUEUE = "gpu"
"""The queue of edits, consumed by the model workers."""
DEFAULT_QUEUE = "default"
"""The queue of bookkeeping (the reconciler)."""
TASK_ROUTES: dict[str, dict[str, str]] = {
    EDIT_ITEMS_TASK: {"queue": GPU_QUEUE},
    RECONCILE_TASK: {"queue": DEFAULT_QUEUE},
    PUBLISH_EDITS_TASK: {"queue": DEFAULT_QUEUE},
    DELIVER_WEBHOOK_TASK: {"queue": DEFAULT_QUEUE},
    DISPATCH_SCHEDULES_TASK: {"queue": DEFAULT_QUEUE},
    START_RUN_TASK: {"queue": DEFAULT_QUEUE},
}
MIN_VISIBILITY_TIMEOUT_SECONDS = 60
BROKER_CHECK_TIMEOUT_SECONDS = 2.0
"""How long ``Publisher.check`` waits for the broker."""


class BrokerUnavailableError(Exception):
    """The broker cannot be reached, so work cannot be published now."""


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


class Publisher(Protocol):
    """Publishes work for the workers; call it only after the rows the work refers to are committed."""

    def edits(self, item_ids: Sequence[UUID]) -> None:
        """Publish edits of the items, in micro-batches."""

    def send(self, task_name: str, args: Sequence[Any] = ()) -> None:
        """Publish one task by name, on the queue ``TASK_ROUTES`` gives it."""

    def check(self) -> None:
        """Raise ``BrokerUnavailableError`` if work could not be published now."""


class NullPublisher:
    """Publishes nothing: the work stays in the database for whoever reconciles it (no broker configured)."""

    def check(self) -> None:
        """Nothing to reach."""

    def edits(self, item_ids: Sequence[UUID]) -> None:
        """Do nothing."""

    def send(self, task_name: str, args: Sequence[Any] = ()) -> None:
        """Do nothing."""


class CeleryPublisher:
    """Publishes tasks by name to the workers' broker; the Celery client connects on the first publish."""

    def __init__(self, broker_url: str, micro_batch_size: int = 1, lease_seconds: int = 600) -> None:
        from celery import Celery

        self.micro_batch_size = micro_batch_size
        self.client = Celery("xmgie-dispatch", broker=broker_url, set_as_current=False)
        self.client.conf.update(
            task_routes=TASK_ROUTES,
            broker_transport_options={"visibility_timeout": visibility_timeout_seconds(lease_seconds)},
            broker_connection_retry_on_startup=True,
        )

    def edits(self, item_ids: Sequence[UUID]) -> None:
        """Publish ``xmgie.edit_items`` for the items in micro-batches of ``micro_batch_size``; beyond
        ``DIRECT_PUBLISH_MESSAGES`` messages, one ``xmgie.publish_edits`` that a worker expands."""
        batches = micro_batches(item_ids, self.micro_batch_size)
        if len(batches) > DIRECT_PUBLISH_MESSAGES:
            self.send(PUBLISH_EDITS_TASK, [[item for batch in batches for item in batch], self.micro_batch_size])
            return
        publish_batches(self.client, batches)

    def send(self, task_name: str, args: Sequence[Any] = ()) -> None:
        """Publish ``task_name`` with ``args`` on its queue."""
        self.client.send_task(task_name, args=list(args), queue=TASK_ROUTES[task_name]["queue"])

    def check(self) -> None:
        """Open (or reuse) a broker connection within ``BROKER_CHECK_TIMEOUT_SECONDS``; ``BrokerUnavailableError``
        if the broker does not answer."""
        try:
            with self.client.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0, timeout=BROKER_CHECK_TIMEOUT_SECONDS)
                ping = getattr(getattr(connection.default_channel, "client", None), "ping", None)
                if ping is not None:
                    # A pooled Redis channel may predate a broker restart: ask the server itself.
                    ping()
        except Exception as error:  # noqa: BLE001 - any failure to reach the broker means the same to the caller
            raise BrokerUnavailableError(f"the broker is not reachable: {type(error).__name__}: {error}") from error


def celery_dispatcher(
    broker_url: str, micro_batch_size: int = 1, lease_seconds: int = 600
) -> Callable[[Sequence[UUID]], None]:
    """A ``dispatch(item_ids)`` publishing ``xmgie.edit_items`` messages to the ``gpu`` queue of ``broker_url``."""
    return CeleryPublisher(broker_url, micro_batch_size, lease_seconds).edits


def publish_batches(client: Any, batches: Sequence[list[str]]) -> None:
    """Publish one ``xmgie.edit_items`` message per batch on the ``gpu`` queue of ``client`` (a Celery app), over
    one producer (one broker connection for all of them)."""
    if not batches:
        return
    with client.producer_or_acquire() as producer:
        for batch in batches:
            client.send_task(EDIT_ITEMS_TASK, args=[batch], queue=GPU_QUEUE, producer=producer)
