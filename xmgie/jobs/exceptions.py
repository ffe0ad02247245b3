"""Named errors of the job domain; routes map them to HTTP codes, tasks to item outcomes."""

from __future__ import annotations


class JobError(Exception):
    """Base class of every error raised by the job domain."""


class NoSuchJobError(JobError):
    """The job does not exist, or it belongs to another tenant."""


class NoSuchItemError(JobError):
    """The item does not exist."""


class JobAlreadyTerminalError(JobError):
    """The job has finished (succeeded, failed, partial or canceled) and cannot change any more."""


class LeaseLostError(JobError):
    """The worker no longer holds the item's lease: another worker claimed it, or the item was finished or canceled."""


class InvalidJobError(JobError, ValueError):
    """The job submission is malformed (no items, too many items, unknown item fields)."""


class IdempotencyKeyReusedError(JobError):
    """The tenant's idempotency key belongs to a job submitted with another request body."""
