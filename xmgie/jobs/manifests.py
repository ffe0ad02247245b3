"""The results manifest of a job: one JSON object per item, stored as ``jobs/<job>/manifest.jsonl``."""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from xmgie.jobs.models import Item
from xmgie.jobs.storage import Storage, manifest_key

MANIFEST_CONTENT_TYPE = "application/x-ndjson"


def results_manifest_lines(session: Session, job_id: uuid.UUID) -> list[dict[str, Any]]:
    """One JSON-ready object per item of the job, by index: its status, input, result and error."""
    items = session.execute(select(Item).where(Item.job_id == job_id).order_by(Item.index)).scalars()
    lines = []
    for item in items:
        metrics = item.metrics or {}
        lines.append(
            {
                "index": item.index,
                "status": item.status,
                "input": item.input_key,
                "instruction": item.instruction,
                "mask": item.mask_key,
                "seed": item.seed,
                "output": item.output_key,
                "mask_output": item.mask_output_key,
                "sha256": item.output_sha256,
                "expressive_instruction": item.expressive_instruction,
                "identity_score": metrics.get("identity_score"),
                "preservation": metrics.get("preservation"),
                "edit_scope": metrics.get("edit_scope"),
                "mask_fraction": metrics.get("mask_fraction"),
                "attempts": item.attempts,
                "error_code": item.error_code,
                "error_message": item.error_message,
            }
        )
    return lines


def manifest_bytes(lines: list[dict[str, Any]]) -> bytes:
    """The JSON Lines encoding of ``lines`` (UTF-8, one object per line, trailing newline)."""
    return "".join(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n" for line in lines).encode()


def write_results_manifest(session: Session, storage: Storage, job_id: uuid.UUID) -> str:
    """Store the job's results manifest under ``jobs/<job>/manifest.jsonl`` (replacing any) and return its key."""
    key = manifest_key(job_id)
    storage.put_bytes(key, manifest_bytes(results_manifest_lines(session, job_id)), MANIFEST_CONTENT_TYPE)
    return key
