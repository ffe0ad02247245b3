"""Settings: embedded defaults derived from the data folder, XMGIE_ environment variables, refused values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from xmgie.jobs.settings import Settings, get_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("XMGIE_"):
            monkeypatch.delenv(name)


def test_embedded_defaults_live_under_the_data_folder(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.database_url == f"sqlite:///{tmp_path}/xmgie.db"
    assert settings.storage_url == f"file://{tmp_path}/storage"
    assert settings.broker_url is None
    assert settings.model == "mini"
    assert (settings.max_items_per_job, settings.max_attempts, settings.lease_seconds) == (10_000, 3, 600)
    assert settings.max_image_pixels == 4096 * 4096
    assert settings.max_upload_bytes == 20 * 1024 * 1024


def test_default_data_folder_expands_home() -> None:
    assert Settings().data_dir == Path("~/.local/share/xmgie").expanduser()


def test_environment_variables_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XMGIE_DATABASE_URL", "postgresql://postgres@db/xmgie")
    monkeypatch.setenv("XMGIE_STORAGE_URL", "s3://results")
    monkeypatch.setenv("XMGIE_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("XMGIE_DTYPE", "float16")
    settings = Settings()
    assert settings.database_url == "postgresql://postgres@db/xmgie"
    assert settings.storage_url == "s3://results"
    assert settings.max_attempts == 5
    assert settings.dtype == "float16"


@pytest.mark.parametrize(
    "values",
    [
        {"database_url": "mysql://db/xmgie"},
        {"storage_url": "ftp://host/folder"},
        {"storage_url": "s3://"},
        {"max_attempts": 0},
        {"lease_seconds": -1},
        {"device": "tpu"},
        {"dtype": "float8"},
        {"s3_access_key_id": "key"},
        {"micro_batch_size": 8, "max_items_per_job": 4},
    ],
)
def test_refuses_wrong_values(values: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**values)


def test_get_settings_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    get_settings.cache_clear()
    monkeypatch.setenv("XMGIE_MODEL", "/models/xmgie")
    try:
        first = get_settings()
        monkeypatch.setenv("XMGIE_MODEL", "tiny")
        assert get_settings() is first
        assert first.model == "/models/xmgie"
    finally:
        get_settings.cache_clear()
