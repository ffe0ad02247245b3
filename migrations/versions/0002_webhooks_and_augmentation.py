"""Webhook delivery state of jobs; schedules, runs and augmentations of dataset augmentation.

The ``schedules`` and ``runs`` tables of 0001 were placeholders that no code wrote to; this revision replaces
them with their working shape (the downgrade restores the placeholders, empty).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def timestamp(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("webhook_status", sa.String(16), nullable=True))
        batch.add_column(sa.Column("webhook_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("webhook_error", sa.Text(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("webhook_attempts", server_default=None)

    op.drop_table("runs")
    op.drop_index("ix_schedules_tenant_id", table_name="schedules")
    op.drop_table("schedules")

    op.create_table(
        "schedules",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("cron", sa.String(100), nullable=True),
        sa.Column("interval_seconds", sa.Integer(), nullable=True),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("source_prefix", sa.String(1024), nullable=True),
        sa.Column("source_keys", sa.JSON(), nullable=True),
        sa.Column("instructions", sa.JSON(), nullable=False),
        sa.Column("variants", sa.Integer(), nullable=False),
        sa.Column("target_prefix", sa.String(1024), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        timestamp("last_slot", nullable=True),
        timestamp("created_at"),
        timestamp("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_schedules"),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name="fk_schedules_tenant_id_tenants", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("tenant_id", "name", name="uq_schedules_tenant_id_name"),
    )
    op.create_index("ix_schedules_tenant_id", "schedules", ["tenant_id"])

    op.create_table(
        "runs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("schedule_id", sa.Uuid(), nullable=False),
        timestamp("slot"),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=True),
        sa.Column("image_count", sa.Integer(), nullable=False),
        sa.Column("item_count", sa.Integer(), nullable=False),
        sa.Column("succeeded_count", sa.Integer(), nullable=False),
        sa.Column("failed_count", sa.Integer(), nullable=False),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        timestamp("created_at"),
        timestamp("started_at", nullable=True),
        timestamp("finished_at", nullable=True),
        timestamp("published_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
        sa.ForeignKeyConstraint(
            ["schedule_id"], ["schedules.id"], name="fk_runs_schedule_id_schedules", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_runs_job_id_jobs", ondelete="SET NULL"),
        sa.UniqueConstraint("schedule_id", "slot", name="uq_runs_schedule_id_slot"),
    )
    op.create_index("ix_runs_schedule_id_created_at", "runs", ["schedule_id", "created_at"])

    op.create_table(
        "augmentations",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("schedule_id", sa.Uuid(), nullable=False),
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("item_id", sa.Uuid(), nullable=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("source_key", sa.String(1024), nullable=False),
        sa.Column("instruction_index", sa.Integer(), nullable=False),
        sa.Column("instruction", sa.Text(), nullable=False),
        sa.Column("variant", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("file_name", sa.String(1024), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_augmentations"),
        sa.ForeignKeyConstraint(
            ["schedule_id"], ["schedules.id"], name="fk_augmentations_schedule_id_schedules", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_augmentations_run_id_runs", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], name="fk_augmentations_item_id_items", ondelete="SET NULL"),
        sa.UniqueConstraint(
            "run_id", "source_key", "instruction_index", "variant",
            name="uq_augmentations_run_id_source_key_instruction_index_variant",
        ),
    )
    op.create_index(
        "ix_augmentations_schedule_id_fingerprint_source_key",
        "augmentations",
        ["schedule_id", "fingerprint", "source_key"],
    )
    op.create_index("ix_augmentations_run_id", "augmentations", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_augmentations_run_id", table_name="augmentations")
    op.drop_index("ix_augmentations_schedule_id_fingerprint_source_key", table_name="augmentations")
    op.drop_table("augmentations")
    op.drop_index("ix_runs_schedule_id_created_at", table_name="runs")
    op.drop_table("runs")
    op.drop_index("ix_schedules_tenant_id", table_name="schedules")
    op.drop_table("schedules")
    op.create_table(
        "schedules",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("cron", sa.String(100), nullable=False),
        sa.Column("source_prefix", sa.String(1024), nullable=False),
        sa.Column("output_prefix", sa.String(1024), nullable=False),
        sa.Column("instructions", sa.JSON(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        timestamp("created_at"),
        timestamp("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_schedules"),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name="fk_schedules_tenant_id_tenants", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_schedules_tenant_id", "schedules", ["tenant_id"])
    op.create_table(
        "runs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("schedule_id", sa.Uuid(), nullable=False),
        timestamp("slot"),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
        sa.ForeignKeyConstraint(
            ["schedule_id"], ["schedules.id"], name="fk_runs_schedule_id_schedules", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_runs_job_id_jobs", ondelete="SET NULL"),
        sa.UniqueConstraint("schedule_id", "slot", name="uq_runs_schedule_id_slot"),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("webhook_error")
        batch.drop_column("webhook_attempts")
        batch.drop_column("webhook_status")
