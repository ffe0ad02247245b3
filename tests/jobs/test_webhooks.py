"""Webhooks: marked pending by the transition that ends a job, POSTed to a real HTTP server, failures recorded
and logged without touching the job."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tests.services import Receiver, webhook_receiver
from xmgie.jobs import transitions, webhooks
from xmgie.jobs.db import make_session_factory
from xmgie.jobs.models import Job
from xmgie.jobs.settings import Settings


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as state:
        yield state


def finished_job(session: Session, tenant_id: uuid.UUID, webhook_url: str | None, *, fail: bool = False) -> uuid.UUID:
    """A one-item job run to its end (succeeded, or failed with ``fail``) through the transitions."""
    items = [{"input_key": "uploads/x.png", "instruction": "make it snowy"}]
    job, _ = transitions.create_job(session=session, tenant_id=tenant_id, items=items, webhook_url=webhook_url)
    session.commit()
    item = job.items[0]
    transitions.claim_item(session=session, item_id=item.id, worker="w", lease_seconds=60, max_attempts=3)
    session.commit()
    if fail:
        transitions.fail_item(session=session, item_id=item.id, worker="w", code="bad", message="no", retry=False)
    else:
        transitions.succeed_item(session=session, item_id=item.id, worker="w", output_key="k", output_sha256="0" * 64)
    session.commit()
    return job.id


def reload(engine: Engine, job_id: uuid.UUID) -> Job:
    with make_session_factory(engine)() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_ending_a_job_marks_its_webhook_pending_in_the_same_transition(session, tenant_id, migrated_engine):
    with_hook = finished_job(session, tenant_id, "http://example.invalid/hook")
    without_hook = finished_job(session, tenant_id, None)
    assert reload(migrated_engine, with_hook).webhook_status == "pending"
    assert reload(migrated_engine, without_hook).webhook_status is None

    items = [{"input_key": "uploads/x.png", "instruction": "a"}]
    running, _ = transitions.create_job(session=session, tenant_id=tenant_id, items=items, webhook_url="http://h/")
    session.commit()
    assert reload(migrated_engine, running.id).webhook_status is None
    transitions.cancel_job(session=session, job_id=running.id)
    session.commit()
    assert reload(migrated_engine, running.id).webhook_status == "pending"


def test_delivery_posts_the_signed_summary_once(session, tenant_id, migrated_engine, receiver):
    job_id = finished_job(session, tenant_id, receiver.url, fail=True)
    settings = Settings(webhook_secret="s3cret", webhook_allow_private_networks=True)
    factory = make_session_factory(migrated_engine)

    assert webhooks.deliver_webhook(session_factory=factory, job_id=job_id, settings=settings) == "delivered"
    assert webhooks.deliver_webhook(session_factory=factory, job_id=job_id, settings=settings) == "delivered"

    assert len(receiver.requests) == 1
    headers, body = receiver.requests[0]
    payload = json.loads(body)
    assert payload["event"] == "job.finished"
    assert payload["job"]["id"] == str(job_id)
    assert payload["job"]["status"] == "failed"
    assert payload["job"]["counts"]["failed"] == 1
    assert headers["x-xmgie-delivery"] == str(job_id)
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert headers["x-xmgie-signature"] == f"sha256={expected}"
    job = reload(migrated_engine, job_id)
    assert (job.webhook_status, job.webhook_attempts, job.webhook_error) == ("delivered", 1, None)


def test_failed_deliveries_are_recorded_and_logged_but_never_fail_the_job(
    session, tenant_id, migrated_engine, receiver, caplog
):
    receiver.status = 500
    job_id = finished_job(session, tenant_id, receiver.url)
    settings = Settings(webhook_max_attempts=2, webhook_allow_private_networks=True)
    factory = make_session_factory(migrated_engine)

    with caplog.at_level(logging.WARNING, logger="xmgie.jobs.webhooks"):
        first = webhooks.deliver_webhook(session_factory=factory, job_id=job_id, settings=settings)
        job = reload(migrated_engine, job_id)
        assert (first, job.webhook_attempts, job.webhook_error, job.status) == ("pending", 1, "HTTP 500", "succeeded")
        second = webhooks.deliver_webhook(session_factory=factory, job_id=job_id, settings=settings)
        third = webhooks.deliver_webhook(session_factory=factory, job_id=job_id, settings=settings)

    assert (second, third) == ("failed", "failed")
    assert len(receiver.requests) == 2
    job = reload(migrated_engine, job_id)
    assert (job.webhook_status, job.webhook_attempts, job.status) == ("failed", 2, "succeeded")
    assert any("failed for good after 2 attempts" in record.getMessage() for record in caplog.records)
    assert [request[0]["x-xmgie-attempt"] for request in receiver.requests] == ["1", "2"]


def test_an_unreachable_receiver_is_a_failed_attempt(session, tenant_id, migrated_engine, receiver):
    receiver_port_closed = "http://127.0.0.1:9/hook"
    job_id = finished_job(session, tenant_id, receiver_port_closed)
    factory = make_session_factory(migrated_engine)
    settings = Settings(webhook_timeout_seconds=2, webhook_allow_private_networks=True)

    assert webhooks.deliver_webhook(session_factory=factory, job_id=job_id, settings=settings) == "pending"
    job = reload(migrated_engine, job_id)
    assert job.webhook_attempts == 1 and job.webhook_error and "Error" in job.webhook_error
    assert webhooks.deliver_webhook(session_factory=factory, job_id=uuid.uuid4(), settings=settings) is None


def test_retry_delays_grow_and_stay_bounded():
    delays = [webhooks.retry_delay_seconds(attempts) for attempts in range(1, 12)]
    assert delays == sorted(delays) and delays[0] == 10 and delays[-1] == 600


def test_webhooks_to_internal_addresses_are_refused_unless_allowed(session, tenant_id, migrated_engine, receiver):
    job_id = finished_job(session, tenant_id, receiver.url)
    factory = make_session_factory(migrated_engine)

    status = webhooks.deliver_webhook(session_factory=factory, job_id=job_id, settings=Settings())

    assert status == "failed" and receiver.requests == []
    job = reload(migrated_engine, job_id)
    assert job.webhook_attempts == 1 and "non-public address 127.0.0.1" in job.webhook_error
    assert webhooks.private_address("http://10.1.2.3/x") == "10.1.2.3"
    assert webhooks.private_address("http://[::1]:8080/x") == "::1"
    assert webhooks.private_address("http://169.254.169.254/latest/meta-data") == "169.254.169.254"
    assert webhooks.private_address("http://8.8.8.8/hook") is None
