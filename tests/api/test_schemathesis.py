"""schemathesis against a real ``xmgie api`` process: every operation of ``/openapi.json`` fuzzed with positive and
negative data, and no answer may be a 5xx, an undocumented status or a body outside its schema.

The run is seeded (the same cases every time) and kept small (a few thousand requests, well under a minute of CPU),
so it runs in the default test run (``-m schemathesis`` runs it alone); raise ``MAX_EXAMPLES`` locally for a longer
hunt. A job, a schedule and an upload
exist beforehand and their ids are what the path parameters and items' images mostly are, so the fuzzer reaches the
routes' own checks and not only the 404 of an unknown id.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.api.conftest import png_bytes
from tests.services import api_server, service_env
from xmgie.jobs.auth import create_api_key, tenant_for_key
from xmgie.jobs.db import make_engine, session_scope
from xmgie.jobs.migrate import upgrade_database
from xmgie.jobs.settings import Settings
from xmgie.jobs.storage import data_prefix, storage_from_settings
from xmgie.jobs.uploads import store_upload

pytestmark = pytest.mark.schemathesis

CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance,negative_data_rejection"
MAX_EXAMPLES = 15
"""Cases per operation and phase (17 operations)."""


@dataclass
class Target:
    """The running API, its key and the ids of what exists in it."""

    url: str
    key: str
    upload: str
    job_id: str
    schedule_id: str
    folder: Path


def _post_json(url: str, key: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    folder = tmp_path_factory.mktemp("schemathesis")
    settings = Settings(
        data_dir=folder, database_url=f"sqlite:///{folder / 'xmgie.db'}", storage_url=f"file://{folder / 'storage'}"
    )
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    with session_scope(engine) as session:
        key = create_api_key(session=session, tenant_name="fuzzer")
    with session_scope(engine) as session:
        tenant = tenant_for_key(session=session, key=key)
        assert tenant is not None
        tenant_id = tenant.id
    engine.dispose()
    stored = store_upload(
        storage=storage_from_settings(settings),
        tenant_id=tenant_id,
        data=png_bytes(),
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_image_pixels,
    )
    env = service_env(
        XMGIE_DATA_DIR=str(folder), XMGIE_DATABASE_URL=settings.database_url, XMGIE_STORAGE_URL=settings.storage_url
    )
    with api_server(env, folder / "api.log") as url:
        job = _post_json(
            f"{url}/v1/jobs", key, {"items": [{"image": stored.reference, "instruction": "make it blue"}]}
        )
        own = data_prefix(tenant_id)
        schedule = _post_json(
            f"{url}/v1/schedules",
            key,
            {
                "name": "nightly",
                "cron": "0 3 * * *",
                "source": {"prefix": f"{own}photos/"},
                "instructions": ["make it snowy"],
                "target_prefix": f"{own}augmented/",
            },
        )
        yield Target(url, key, stored.reference, str(job["id"]), str(schedule["id"]), folder)


def test_the_api_keeps_its_openapi_contract_under_fuzzing(target: Target) -> None:
    config = target.folder / "schemathesis.toml"
    config.write_text(
        f"""
[dictionaries.uploads]
values = ["{target.upload}"]

[parameters]
job_id = "{target.job_id}"
schedule_id = "{target.schedule_id}"
"body.items[*].image" = {{ dictionary = "uploads", probability = 0.7 }}
"""
    )
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(config),
        "run",
        f"{target.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {target.key}",
        "--checks",
        CHECKS,
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "20261202",
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--no-color",
    ]
    result = subprocess.run(command, cwd=target.folder, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20000:]
    summary = [line for line in output.splitlines() if " generated, " in line]
    assert summary, output[-5000:]
    generated = int(summary[-1].split()[0])
    assert generated > 17 * MAX_EXAMPLES, summary
