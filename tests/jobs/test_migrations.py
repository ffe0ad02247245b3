"""The migrations build the whole schema on empty SQLite and PostgreSQL databases, exactly as the models say."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, inspect

from tests.jobs.databases import fresh_postgres_database
from xmgie.jobs.db import make_engine
from xmgie.jobs.migrate import downgrade_database, migrations_dir, upgrade_database
from xmgie.jobs.models import Base

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def schema_differences(url: str, metadata: MetaData = Base.metadata) -> list[object]:
    """What Alembic autogenerate would change to make the database at ``url`` match ``metadata``."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, metadata)
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def expected_tables() -> set[str]:
    return set(Base.metadata.tables) | {"alembic_version"}


def test_upgrade_empty_sqlite_file_matches_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgrade_database(url)
    assert table_names(url) == expected_tables()
    assert schema_differences(url) == []


@pytest.mark.usefixtures("postgres_available")
def test_upgrade_empty_postgresql_database_matches_models() -> None:
    with fresh_postgres_database() as url:
        assert table_names(url) == set()
        upgrade_database(url)
        assert table_names(url) == expected_tables()
        assert schema_differences(url) == []


def test_comparison_notices_a_model_change(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgrade_database(url)
    changed = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["items"].append_column(Column("priority", Integer, nullable=False))
    differences = schema_differences(url, changed)
    assert [difference[0] for difference in differences] == ["add_column"]


def test_downgrade_to_base_and_upgrade_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgrade_database(url)
    downgrade_database(url, revision="base")
    assert table_names(url) == {"alembic_version"}
    upgrade_database(url)
    assert schema_differences(url) == []


def test_alembic_command_line_configuration_takes_the_url_from_x_argument(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    config = Config(str(REPOSITORY_ROOT / "alembic.ini"), cmd_opts=argparse.Namespace(x=[f"url={url}"]))
    config.attributes["configure_logging"] = False
    command.upgrade(config, "head")
    assert table_names(url) == expected_tables()


def test_migrations_folder_is_found() -> None:
    assert migrations_dir() == REPOSITORY_ROOT / "migrations"
    assert (migrations_dir() / "versions" / "0001_initial.py").is_file()
