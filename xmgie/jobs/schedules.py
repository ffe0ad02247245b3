"""Schedules of dataset augmentation: their rules, checked once for the API and ``xmgie augment`` alike.

A schedule fires on *slots*: the times of its cron expression in its time zone, or every ``interval_seconds``
counted from its creation. At each check the dispatcher takes only the latest slot that has passed (so slots
missed while nothing ran fire once, not once each) and fires it only if it is later than the schedule's
``last_slot`` (so a slot fires once, whoever checks). A run edits each source image with each instruction,
``variants`` times, with seeds derived from (schedule, image, instruction, variant): the same inputs give the same
outputs, run after run. Runs are incremental under a *fingerprint* of what shapes the outputs (instructions, their
options, variants, job options): changing any of it re-augments every image.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from xmgie.editing.errors import EditInputError
from xmgie.editing.images import check_instruction
from xmgie.editing.options import merge_options, validate_options
from xmgie.jobs.storage import InvalidKeyError, data_prefix, validate_key, validate_prefix
from xmgie.jobs.uploads import in_tenant_space

MIN_INTERVAL_SECONDS = 1
MAX_VARIANTS = 16
MAX_INSTRUCTIONS = 100
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
"""Files of a source prefix that count as images (by name, case-insensitive); others are ignored."""
METADATA_FILE = "metadata.jsonl"
"""The dataset manifest under a schedule's target prefix (Hugging Face ``datasets`` imagefolder layout)."""
IMAGES_FOLDER = "images"


class ScheduleError(EditInputError):
    """A schedule that cannot be accepted; ``code`` says why (``invalid_cron``, ``source_outside_tenant_space``...)."""


@dataclass(frozen=True)
class Instruction:
    """One instruction of a schedule with the edit options it overrides."""

    instruction: str
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The stored form: ``{"instruction": ..., "options": {...}}``."""
        return {"instruction": self.instruction, "options": dict(self.options)}


def check_options(options: Mapping[str, Any], what: str = "options") -> dict[str, Any]:
    """``options`` if ``EditOptions`` accepts them; ``invalid_option`` otherwise."""
    validate_options(options, what)
    return dict(options)


def parse_instructions(
    raw: Sequence[str | Mapping[str, Any]], job_options: Mapping[str, Any], max_chars: int
) -> list[Instruction]:
    """The schedule's instructions from strings or ``{"instruction", "options"}`` objects, each checked with the
    job options merged under its own."""
    if not raw:
        raise ScheduleError("empty_instructions", "a schedule needs at least one instruction")
    if len(raw) > MAX_INSTRUCTIONS:
        raise ScheduleError("too_many_instructions", f"at most {MAX_INSTRUCTIONS} instructions, got {len(raw)}")
    parsed = []
    for index, entry in enumerate(raw):
        if isinstance(entry, str):
            text, options = entry, {}
        elif isinstance(entry, Mapping) and set(entry) <= {"instruction", "options"} and "instruction" in entry:
            text, options = entry["instruction"], dict(entry.get("options") or {})
        else:
            raise ScheduleError(
                "invalid_instruction", f"instruction {index} must be a string or {{'instruction', 'options'}}"
            )
        try:
            text = check_instruction(text, max_chars)
            check_options(merge_options(job_options, options), f"options of instruction {index}")
        except EditInputError as error:
            raise ScheduleError(error.code, f"instruction {index}: {error.message}") from None
        parsed.append(Instruction(text, options))
    return parsed


def check_timing(cron: str | None, interval_seconds: int | None, timezone: str) -> None:
    """Exactly one of a valid cron expression (five fields) and an interval of at least one second; a known zone."""
    if (cron is None) == (interval_seconds is None):
        raise ScheduleError("invalid_timing", "give either cron or interval_seconds, not both and not neither")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError("invalid_timezone", f"unknown time zone {timezone!r}") from None
    if cron is not None and (len(cron.split()) != 5 or not croniter.is_valid(cron)):
        raise ScheduleError(
            "invalid_cron", f"{cron!r} is not a five-field cron expression (minute hour day month dow)"
        )
    if interval_seconds is not None and interval_seconds < MIN_INTERVAL_SECONDS:
        raise ScheduleError("invalid_interval", f"interval_seconds must be at least {MIN_INTERVAL_SECONDS}")


def _folder(prefix: str, what: str, code: str) -> str:
    """``prefix`` as a safe folder prefix ending with ``/`` (so ``photos`` never also matches ``photos2/``)."""
    if not prefix.endswith("/"):
        prefix += "/"
    try:
        return validate_prefix(prefix)
    except InvalidKeyError as error:
        raise ScheduleError(code, f"{what} prefix {prefix!r}: {error}") from None


def check_source_prefix(prefix: str, tenant_id: uuid.UUID) -> str:
    """A source folder inside the tenant's space (``data/<tenant>/...`` or ``uploads/<tenant>/...``), ending with
    ``/``."""
    own = (data_prefix(tenant_id), f"uploads/{tenant_id}/")
    prefix = _folder(prefix, "source", "source_outside_tenant_space")
    if not prefix.startswith(own):
        raise ScheduleError(
            "source_outside_tenant_space", f"source prefix {prefix!r} must start with {own[0]!r} or {own[1]!r}"
        )
    return prefix


def check_source_images(images: Sequence[str], tenant_id: uuid.UUID) -> list[str]:
    """A non-empty list of references in the tenant's space (they are read, and may fail, when a run edits them)."""
    if not images:
        raise ScheduleError("empty_source", "a source manifest needs at least one image")
    for reference in images:
        if not in_tenant_space(reference, tenant_id):
            raise ScheduleError(
                "source_outside_tenant_space", f"{reference!r} is not an upload or data-space image of this tenant"
            )
    return list(dict.fromkeys(images))


def check_target_prefix(
    prefix: str,
    tenant_id: uuid.UUID,
    *,
    source_prefix: str | None = None,
    source_keys: Sequence[str] = (),
) -> str:
    """A target prefix in the tenant's data space, ending with ``/``, apart from the source: a target inside the
    source would feed each run's outputs to the next run (``target_overlaps_source``)."""
    own = data_prefix(tenant_id)
    prefix = _folder(prefix, "target", "target_outside_tenant_space")
    if not prefix.startswith(own) or prefix == own:
        raise ScheduleError("target_outside_tenant_space", f"target prefix {prefix!r} must be a folder under {own!r}")
    if source_prefix is not None and (prefix.startswith(source_prefix) or source_prefix.startswith(prefix)):
        raise ScheduleError(
            "target_overlaps_source", f"target prefix {prefix!r} and source prefix {source_prefix!r} overlap"
        )
    inside = [key for key in source_keys if key.startswith(prefix)]
    if inside:
        raise ScheduleError("target_overlaps_source", f"source image {inside[0]!r} is under the target prefix")
    return prefix


def check_variants(variants: int) -> int:
    """Between 1 and ``MAX_VARIANTS``."""
    if not 1 <= variants <= MAX_VARIANTS:
        raise ScheduleError("invalid_variants", f"variants must be between 1 and {MAX_VARIANTS}, got {variants}")
    return variants


# --- Slots ---------------------------------------------------------------------------------------------------------


def latest_slot(
    *, cron: str | None, interval_seconds: int | None, timezone: str, anchor: datetime, now: datetime
) -> datetime | None:
    """The latest slot at or before ``now`` and after ``anchor`` (the schedule's creation), in UTC; None if none yet.

    Interval slots are ``anchor + k * interval`` (k ≥ 1). Cron slots are the expression's times in ``timezone``
    (daylight saving transitions as croniter resolves them).
    """
    if interval_seconds is not None:
        steps = math.floor((now - anchor).total_seconds() / interval_seconds)
        return anchor + timedelta(seconds=steps * interval_seconds) if steps >= 1 else None
    assert cron is not None
    zone = ZoneInfo(timezone)
    # croniter's get_prev from now + 1 µs includes a slot exactly at now.
    previous = croniter(cron, (now + timedelta(microseconds=1)).astimezone(zone)).get_prev(datetime)
    slot = previous.astimezone(UTC)
    return slot if slot > anchor else None


def next_slot(*, cron: str | None, interval_seconds: int | None, timezone: str, anchor: datetime, now: datetime):
    """The first slot after ``now`` (what the API shows as the next firing)."""
    if interval_seconds is not None:
        steps = max(math.floor((now - anchor).total_seconds() / interval_seconds) + 1, 1)
        return anchor + timedelta(seconds=steps * interval_seconds)
    assert cron is not None
    return croniter(cron, now.astimezone(ZoneInfo(timezone))).get_next(datetime).astimezone(UTC)


# --- What a run produces -------------------------------------------------------------------------------------------


def fingerprint(instructions: Sequence[Mapping[str, Any]], variants: int, options: Mapping[str, Any]) -> str:
    """sha256 (hex) of everything that shapes a schedule's outputs; equal fingerprints mean the same outputs."""
    canonical = json.dumps(
        {"instructions": list(instructions), "variants": variants, "options": dict(options)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def derived_seed(schedule_id: uuid.UUID, source_key: str, instruction: str, variant: int) -> int:
    """The noise seed of one output: a stable function of (schedule, image key, instruction, variant)."""
    text = f"{schedule_id}\0{source_key}\0{instruction}\0{variant}"
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % (2**31)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def output_file_name(fingerprint_: str, source_key: str, instruction_index: int, variant: int) -> str:
    """Where one output goes, relative to the target prefix: ``images/<fp12>/<stem>-<key hash>-i<i>-v<v>.png``.

    Unique per (fingerprint, image, instruction, variant), so outputs of different instruction sets never collide
    and a retried output overwrites its own file only.
    """
    stem = _UNSAFE.sub("_", PurePosixPath(source_key).stem)[:80] or "image"
    key_hash = hashlib.sha256(source_key.encode("utf-8")).hexdigest()[:10]
    return f"{IMAGES_FOLDER}/{fingerprint_[:12]}/{stem}-{key_hash}-i{instruction_index}-v{variant}.png"


def is_image_key(key: str) -> bool:
    """Whether a listed key names an image file (by suffix)."""
    try:
        validate_key(key)
    except InvalidKeyError:
        return False
    return PurePosixPath(key).suffix.lower() in IMAGE_SUFFIXES
