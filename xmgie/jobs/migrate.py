"""Bring a database to the newest schema by running the Alembic migrations programmatically.

The migrations live in the top-level ``migrations/`` folder of the source tree (next to ``alembic.ini``), not
inside the ``xmgie`` package: they are found relative to this file (source checkout or editable install) or in the
current directory (e.g. a container whose working directory is the project). A non-editable install run from
elsewhere must pass ``script_location``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config


def migrations_dir() -> Path:
    """The folder holding ``env.py`` and ``versions/``."""
    candidates = (Path(__file__).resolve().parents[2] / "migrations", Path.cwd() / "migrations")
    for candidate in candidates:
        if (candidate / "env.py").is_file():
            return candidate
    searched = ", ".join(str(candidate) for candidate in candidates)
    raise FileNotFoundError(f"no Alembic migrations folder found (looked in {searched})")


def alembic_config(url: str, *, script_location: Path | None = None) -> Config:
    """An Alembic configuration for ``url`` that leaves the caller's logging alone."""
    config = Config()
    config.set_main_option("script_location", str(script_location or migrations_dir()))
    config.attributes["database_url"] = url
    config.attributes["configure_logging"] = False
    return config


def upgrade_database(url: str, *, revision: str = "head", script_location: Path | None = None) -> None:
    """Apply every migration up to ``revision`` (default: the newest) to the database at ``url``."""
    command.upgrade(alembic_config(url, script_location=script_location), revision)


def downgrade_database(url: str, *, revision: str, script_location: Path | None = None) -> None:
    """Undo migrations down to ``revision`` (``"base"`` empties the schema)."""
    command.downgrade(alembic_config(url, script_location=script_location), revision)
