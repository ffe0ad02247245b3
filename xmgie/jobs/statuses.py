"""Item and job statuses, and how a job's status derives from the counts of its items."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class ItemStatus(StrEnum):
    """Where one item is: ``queued → running → succeeded | failed | canceled``."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        """Whether the item is finished and will never change again."""
        return self in _TERMINAL_ITEM_STATUSES


class JobStatus(StrEnum):
    """Where a job is, derived from its items (see ``derive_job_status``)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PARTIAL = "partial"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        """Whether every item of the job is finished."""
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


_TERMINAL_ITEM_STATUSES = frozenset({ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.CANCELED})


def derive_job_status(counts: Mapping[ItemStatus | str, int], *, cancel_requested: bool = False) -> JobStatus:
    """The job status for the given number of items in each status.

    - ``queued`` while nothing has started; ``running`` once any item runs or has finished while others remain;
    - when every item is finished: ``canceled`` if any item was canceled or a cancel was requested,
      otherwise ``failed`` if all failed, ``partial`` if some failed, else ``succeeded``.
    A job without items is ``succeeded``: there is nothing left to do.
    """
    by_status = {ItemStatus(status): int(number) for status, number in counts.items()}
    if any(number < 0 for number in by_status.values()):
        raise ValueError(f"item counts must not be negative, got {dict(counts)!r}")
    queued = by_status.get(ItemStatus.QUEUED, 0)
    running = by_status.get(ItemStatus.RUNNING, 0)
    succeeded = by_status.get(ItemStatus.SUCCEEDED, 0)
    failed = by_status.get(ItemStatus.FAILED, 0)
    canceled = by_status.get(ItemStatus.CANCELED, 0)
    finished = succeeded + failed + canceled
    if queued or running:
        return JobStatus.RUNNING if running or finished else JobStatus.QUEUED
    if canceled or cancel_requested:
        return JobStatus.CANCELED
    if failed and failed == finished:
        return JobStatus.FAILED
    if failed:
        return JobStatus.PARTIAL
    return JobStatus.SUCCEEDED


class WebhookStatus(StrEnum):
    """Delivery of a finished job's webhook: ``pending`` until a 2xx answer (``delivered``) or the last attempt
    (``failed``)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
