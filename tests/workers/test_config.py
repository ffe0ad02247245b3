"""The Celery configuration, the dispatcher, the beat schedule and the commands, without worker processes."""

from __future__ import annotations

import ast
import subprocess
import sys
import uuid

import pytest

from tests.workers.conftest import BROKER_URL, REPO_ROOT
from xmgie.cli import build_parser
from xmgie.jobs.dispatch import (
    DELIVER_WEBHOOK_TASK,
    EDIT_ITEMS_TASK,
    RECONCILE_TASK,
    micro_batches,
    visibility_timeout_seconds,
)
from xmgie.jobs.settings import Settings


def test_the_app_follows_the_processing_rules():
    from workers.celery_app import celery_app

    conf = celery_app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] > Settings().lease_seconds
    assert conf.task_routes[EDIT_ITEMS_TASK] == {"queue": "gpu"}
    assert conf.task_routes[RECONCILE_TASK] == {"queue": "default"}
    assert conf.beat_schedule["reconcile"]["task"] == RECONCILE_TASK
    assert conf.beat_schedule["reconcile"]["schedule"] == Settings().reconcile_seconds == 10.0
    assert conf.beat_schedule["dispatch-schedules"]["schedule"] == Settings().schedule_tick_seconds


def test_importing_the_tasks_loads_no_model():
    # A fresh interpreter: this test process may already hold pipelines loaded by other tests.
    check = (
        "import sys, workers.tasks as tasks\n"
        "from xmgie.jobs import editor\n"
        "assert tasks._resources is None and editor._PIPELINES == {}\n"
        "print(sorted(name for name in tasks.celery_app.tasks if name.startswith('xmgie.')))\n"
        "print([name for name in ('torch', 'diffusers', 'transformers') if name in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    registered, heavy = result.stdout.splitlines()
    assert {EDIT_ITEMS_TASK, RECONCILE_TASK, DELIVER_WEBHOOK_TASK} <= set(ast.literal_eval(registered))
    assert heavy == "[]"


def test_micro_batches_and_visibility_timeout():
    ids = [uuid.uuid4() for _ in range(5)]
    assert micro_batches(ids, 2) == [[str(ids[0]), str(ids[1])], [str(ids[2]), str(ids[3])], [str(ids[4])]]
    assert micro_batches([], 3) == []
    assert visibility_timeout_seconds(2) == 60 and visibility_timeout_seconds(600) == 1200


def test_noop_editor_is_chosen_by_the_environment(monkeypatch):
    from workers.tasks import DelayedNoOpEditor, editor_from_environment
    from xmgie.jobs.editor import LazyPipelineEditor

    monkeypatch.setenv("XMGIE_EDITOR", "noop")
    monkeypatch.setenv("XMGIE_NOOP_DELAY", "0.25")
    editor = editor_from_environment(Settings())
    assert isinstance(editor, DelayedNoOpEditor) and editor.delay == 0.25
    monkeypatch.delenv("XMGIE_EDITOR")
    assert isinstance(editor_from_environment(Settings()), LazyPipelineEditor)
    monkeypatch.setenv("XMGIE_EDITOR", "other")
    with pytest.raises(ValueError, match="XMGIE_EDITOR"):
        editor_from_environment(Settings())


def test_worker_and_beat_commands_parse():
    args = build_parser().parse_args(["worker", "--queues", "gpu", "--concurrency", "2", "--pool", "prefork"])
    assert (args.queues, args.concurrency, args.pool, args.editor) == ("gpu", 2, "prefork", None)
    assert build_parser().parse_args(["worker", "--editor", "noop"]).editor == "noop"
    assert build_parser().parse_args(["beat"]).command == "beat"


def test_the_api_publishes_to_the_broker_when_one_is_set(tmp_path, redis_db):
    from api.main import create_app
    from xmgie.jobs.dispatch import DELIVER_WEBHOOK_TASK, NullPublisher

    base = {"database_url": f"sqlite:///{tmp_path / 'api.db'}", "storage_url": (tmp_path / "storage").as_uri()}
    quiet = create_app(Settings(**base))
    assert isinstance(quiet.state.publisher, NullPublisher)
    quiet.state.dispatch([uuid.uuid4()])
    assert redis_db.llen("gpu") == 0
    quiet.state.engine.dispose()
    app = create_app(Settings(**base, broker_url=BROKER_URL, micro_batch_size=2))
    app.state.dispatch([uuid.uuid4() for _ in range(3)])
    assert redis_db.llen("gpu") == 2
    app.state.publisher.send(DELIVER_WEBHOOK_TASK, [str(uuid.uuid4())])
    assert redis_db.llen("default") == 1
    app.state.engine.dispose()


def test_a_large_submission_is_one_message_that_a_worker_expands(redis_db):
    from xmgie.jobs.dispatch import DIRECT_PUBLISH_MESSAGES, CeleryPublisher

    publisher = CeleryPublisher(BROKER_URL, micro_batch_size=2)
    publisher.edits([uuid.uuid4() for _ in range(2 * DIRECT_PUBLISH_MESSAGES)])
    assert (redis_db.llen("gpu"), redis_db.llen("default")) == (DIRECT_PUBLISH_MESSAGES, 0)
    redis_db.flushdb()
    publisher.edits([uuid.uuid4() for _ in range(2 * DIRECT_PUBLISH_MESSAGES + 1)])
    assert (redis_db.llen("gpu"), redis_db.llen("default")) == (0, 1)
