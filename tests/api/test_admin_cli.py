"""``xmgie admin create-key`` prints a key that the API accepts; only its hash is stored."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from xmgie.cli import main
from xmgie.jobs.auth import tenant_for_key
from xmgie.jobs.db import make_engine, session_scope
from xmgie.jobs.migrate import upgrade_database
from xmgie.jobs.models import ApiKey
from xmgie.jobs.settings import get_settings


def test_create_key_prints_a_working_key_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'xmgie.db'}"
    upgrade_database(url)
    monkeypatch.setenv("XMGIE_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        assert main(["admin", "create-key", "--tenant", "acme"]) == 0
        assert main(["admin", "create-key", "--tenant", "acme"]) == 0
    finally:
        get_settings.cache_clear()
    first, second = capsys.readouterr().out.split()
    assert first.startswith("xmgie_") and first != second

    engine = make_engine(url)
    with session_scope(engine) as session:
        assert tenant_for_key(session=session, key=first).name == "acme"
        assert tenant_for_key(session=session, key=second).id == tenant_for_key(session=session, key=first).id
        stored = list(session.scalars(select(ApiKey.key_hash)))
        session.execute(ApiKey.__table__.update().values(revoked_at=ApiKey.created_at))
    with session_scope(engine) as session:
        assert tenant_for_key(session=session, key=first) is None
    engine.dispose()
    assert first not in stored and len(stored) == 2
