"""How a job's status derives from its items' statuses."""

from __future__ import annotations

import pytest

from xmgie.jobs.statuses import ItemStatus, JobStatus, derive_job_status


@pytest.mark.parametrize(
    ("counts", "cancel_requested", "expected"),
    [
        ({"queued": 3}, False, JobStatus.QUEUED),
        ({"queued": 2, "running": 1}, False, JobStatus.RUNNING),
        ({"queued": 2, "succeeded": 1}, False, JobStatus.RUNNING),
        ({"succeeded": 3}, False, JobStatus.SUCCEEDED),
        ({"succeeded": 2, "failed": 1}, False, JobStatus.PARTIAL),
        ({"failed": 3}, False, JobStatus.FAILED),
        ({"succeeded": 1, "canceled": 2}, False, JobStatus.CANCELED),
        ({"succeeded": 3}, True, JobStatus.CANCELED),
        ({"running": 1, "canceled": 2}, True, JobStatus.RUNNING),
        ({}, False, JobStatus.SUCCEEDED),
    ],
)
def test_derive_job_status(counts: dict[str, int], cancel_requested: bool, expected: JobStatus) -> None:
    assert derive_job_status(counts, cancel_requested=cancel_requested) is expected


def test_derive_job_status_refuses_negative_counts() -> None:
    with pytest.raises(ValueError, match="negative"):
        derive_job_status({"queued": -1})


def test_terminal_statuses() -> None:
    assert {status for status in ItemStatus if status.is_terminal()} == {
        ItemStatus.SUCCEEDED,
        ItemStatus.FAILED,
        ItemStatus.CANCELED,
    }
    assert {status for status in JobStatus if not status.is_terminal()} == {JobStatus.QUEUED, JobStatus.RUNNING}
    assert ItemStatus("running") == "running"
