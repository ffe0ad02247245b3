"""Webhooks: one POST to a job's ``webhook_url`` once the job has ended, delivered at least once.

The transition that ends a job marks its webhook ``pending`` in the same transaction (``xmgie.jobs.transitions``),
so a delivery is never forgotten; ``deliver_webhook`` then POSTs the job's summary and records the outcome. A
failed attempt (network error, timeout, non-2xx answer) leaves the webhook pending until ``webhook_max_attempts``
attempts have been made, then marks it ``failed``; every failure is logged, and none ever changes the job's own
status. Receivers should treat deliveries as at-least-once: ``X-XMGIE-Delivery`` (the job id) is the same on every
attempt. With ``Settings.webhook_secret`` set, ``X-XMGIE-Signature: sha256=<hex>`` is the HMAC-SHA256 of the body
under that secret. Webhooks to loopback, private or link-local addresses are refused (and fail at once) unless
``Settings.webhook_allow_private_networks`` is set: a tenant must not reach the cluster's internal services.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from xmgie.jobs.models import Job, utc_now
from xmgie.jobs.settings import Settings
from xmgie.jobs.statuses import WebhookStatus

logger = logging.getLogger(__name__)

EVENT = "job.finished"
USER_AGENT = "xmgie-webhook/1"
MAX_ERROR_CHARS = 500

Post = Callable[[str, bytes, Mapping[str, str], float], int]
"""``post(url, body, headers, timeout)``: the HTTP status of the answer; raises ``OSError`` when none came."""


def webhook_payload(job: Job) -> dict[str, Any]:
    """The JSON body of a job's webhook: the event and the job's status, counts and times."""
    return {
        "event": EVENT,
        "job": {
            "id": str(job.id),
            "status": job.status,
            "item_count": job.item_count,
            "counts": {status.value: number for status, number in job.counts.items()},
            "created_at": job.created_at.isoformat(),
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        },
    }


def signature(body: bytes, secret: str) -> str:
    """``sha256=<hex>``: the HMAC-SHA256 of ``body`` under ``secret``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def private_address(url: str) -> str | None:
    """The first loopback, private, link-local or otherwise non-public address ``url``'s host resolves to, or
    None when every address is public. ``OSError`` when the host does not resolve."""
    host = urlsplit(url).hostname
    if not host:
        raise ValueError(f"webhook URL {url!r} has no host")
    for *_rest, sockaddr in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP):
        address = ipaddress.ip_address(sockaddr[0])
        if not address.is_global:
            return str(address)
    return None


def post_json(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
    """POST ``body`` to ``url``; the answer's HTTP status (also for 4xx/5xx). ``OSError`` when no answer came."""
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) checked by the API
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def deliver_webhook(
    *,
    session_factory: Callable[[], Session],
    job_id: uuid.UUID,
    settings: Settings,
    post: Post = post_json,
    now: datetime | None = None,
) -> str | None:
    """Make one delivery attempt of the job's pending webhook; the webhook's status afterwards.

    Returns None when the job has no webhook, and the current status without any request when it is not pending
    (already delivered, or failed for good).
    """
    with session_factory() as session:
        job = session.get(Job, job_id)
        if job is None or job.webhook_url is None or job.webhook_status is None:
            return None
        if job.webhook_status != WebhookStatus.PENDING.value:
            return job.webhook_status
        url = job.webhook_url
        body = json.dumps(webhook_payload(job), separators=(",", ":")).encode("utf-8")
        attempt = job.webhook_attempts + 1
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-XMGIE-Event": EVENT,
        "X-XMGIE-Delivery": str(job_id),
        "X-XMGIE-Attempt": str(attempt),
    }
    if settings.webhook_secret:
        headers["X-XMGIE-Signature"] = signature(body, settings.webhook_secret)

    error: str | None = None
    refused = False
    try:
        internal = None if settings.webhook_allow_private_networks else private_address(url)
        if internal is not None:
            refused = True
            error = f"the webhook URL resolves to the non-public address {internal}"
        else:
            status_code = post(url, body, headers, settings.webhook_timeout_seconds)
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}"
    except (OSError, ValueError) as failure:
        error = f"{type(failure).__name__}: {failure}"[:MAX_ERROR_CHARS]

    if error is None:
        outcome = WebhookStatus.DELIVERED
    elif refused:
        outcome = WebhookStatus.FAILED
        logger.error("webhook of job %s to %s refused: %s", job_id, url, error)
    elif attempt >= settings.webhook_max_attempts:
        outcome = WebhookStatus.FAILED
        logger.error("webhook of job %s to %s failed for good after %d attempts: %s", job_id, url, attempt, error)
    else:
        outcome = WebhookStatus.PENDING
        logger.warning("webhook of job %s to %s failed (attempt %d): %s", job_id, url, attempt, error)
    with session_factory() as session, session.begin():
        recorded = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.webhook_status == WebhookStatus.PENDING.value)
            .values(
                webhook_status=outcome.value,
                webhook_attempts=Job.webhook_attempts + 1,
                webhook_error=error,
                updated_at=now or utc_now(),
            )
            .returning(Job.webhook_status)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
    return recorded or outcome.value


def retry_delay_seconds(attempts: int) -> float:
    """Wait before the next attempt after ``attempts`` failed ones: 10 s, 20 s, 40 s, ... at most 10 minutes."""
    return float(min(10 * 2 ** max(attempts - 1, 0), 600))


def stale_pending_webhooks(
    *, session: Session, older_than_seconds: float, now: datetime | None = None, limit: int = 1000
) -> list[uuid.UUID]:
    """Jobs whose webhook is pending and untouched for ``older_than_seconds``: their delivery message may be lost."""
    cutoff = (now or utc_now()) - timedelta(seconds=older_than_seconds)
    query = (
        select(Job.id)
        .where(Job.webhook_status == WebhookStatus.PENDING.value, Job.updated_at < cutoff)
        .order_by(Job.updated_at)
        .limit(limit)
    )
    return list(session.scalars(query))


def pending_webhooks_of(*, session: Session, job_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """The jobs among ``job_ids`` whose webhook is pending."""
    if not job_ids:
        return []
    query = select(Job.id).where(Job.id.in_(job_ids), Job.webhook_status == WebhookStatus.PENDING.value)
    return list(session.scalars(query))
