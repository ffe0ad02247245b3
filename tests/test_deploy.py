"""docker-compose.yml, read as a user's Docker engine would read it: commands and settings that exist."""

from __future__ import annotations

from pathlib import Path

import yaml

from xmgie.cli import build_parser
from xmgie.jobs.dispatch import TASK_ROUTES
from xmgie.jobs.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_xmgie_service_runs_a_real_subcommand():
    services = compose()["services"]
    commands = {name: s["command"] for name, s in services.items() if s.get("command", [""])[0] == "xmgie"}
    assert set(commands) == {"migrate", "api", "worker", "bookkeeper", "beat"}
    parser = build_parser()
    for name, command in commands.items():
        args = parser.parse_args(command[1:])
        assert args.command == command[1], name
    queues = {name: parser.parse_args(commands[name][1:]).queues.split(",") for name in ("worker", "bookkeeper")}
    # Every queue the service publishes to has a consumer; the GPU worker only edits.
    assert queues == {"worker": ["gpu"], "bookkeeper": ["default"]}
    assert set(TASK_ROUTES[name]["queue"] for name in TASK_ROUTES) == {"gpu", "default"}


def test_every_setting_in_the_stack_is_a_settings_field():
    fields = {f"XMGIE_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose()["services"].items():
        for variable in service.get("environment", {}) if isinstance(service.get("environment"), dict) else {}:
            if variable.startswith("XMGIE_"):
                assert variable in fields, f"{name}: {variable}"
    worker = compose()["services"]["worker"]
    assert worker["environment"]["XMGIE_DEVICE"] == "cuda"
    assert worker["environment"]["XMGIE_BROKER_URL"].startswith("redis://")
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
