"""Checks a job submission item by item and turns it into ``ItemSpec`` rows; errors name the offending item."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from api.errors import ApiError
from api.schemas import ItemCreate, JobCreate
from xmgie.editing.errors import EditInputError
from xmgie.editing.images import check_instruction
from xmgie.editing.options import merge_options, validate_options
from xmgie.jobs.settings import Settings
from xmgie.jobs.storage import Storage
from xmgie.jobs.transitions import ItemSpec
from xmgie.jobs.uploads import resolve_upload


class _SubmissionChecks:
    """What ``item_specs`` checks once per distinct value of a submission, however many items share it.

    A reference is resolved (a storage lookup: a stat locally, a HEAD request on S3) the first time it appears, and
    a merged option set is validated the first time it appears (told apart by its ``repr``); only successes are
    remembered, so the first bad item still raises its own error.
    """

    def __init__(self, storage: Storage, tenant_id: UUID) -> None:
        self.storage = storage
        self.tenant_id = tenant_id
        self.resolved: dict[str, str] = {}
        self.valid_options: set[str] = set()

    def resolve(self, reference: str | None) -> str | None:
        if reference is None:
            return None
        key = self.resolved.get(reference)
        if key is None:
            key = resolve_upload(storage=self.storage, tenant_id=self.tenant_id, reference=reference)
            self.resolved[reference] = key
        return key

    def check_options(self, options: dict[str, Any]) -> None:
        fingerprint = repr(options)
        if fingerprint not in self.valid_options:
            validate_options(options)
            self.valid_options.add(fingerprint)


def _item_spec(item: ItemCreate, job_options: Mapping[str, Any], *, checks: _SubmissionChecks, limit: int) -> ItemSpec:
    instruction = check_instruction(item.instruction, limit)
    options = merge_options(job_options, item.options)
    checks.check_options(options)
    return ItemSpec(
        input_key=checks.resolve(item.image) or "",
        instruction=instruction,
        mask_key=checks.resolve(item.mask),
        identity_key=checks.resolve(item.identity_image),
        options=options,
        seed=item.seed,
    )


def item_specs(*, job_in: JobCreate, tenant_id: UUID, storage: Storage, settings: Settings) -> list[ItemSpec]:
    """The items to create, each with the job's options merged under its own (stored merged, validated); each
    distinct reference and option set is checked once per submission.

    Raises ``ApiError`` 422: ``too_many_items``, or the first bad item's code (``empty_instruction``,
    ``instruction_too_long``, ``invalid_option``, ``unknown_upload``) with its index.
    """
    if len(job_in.items) > settings.max_items_per_job:
        raise ApiError(
            422,
            "too_many_items",
            f"a job has at most {settings.max_items_per_job} items, this one has {len(job_in.items)}",
        )
    checks = _SubmissionChecks(storage, tenant_id)
    specs = []
    for index, item in enumerate(job_in.items):
        try:
            specs.append(_item_spec(item, job_in.options, checks=checks, limit=settings.max_instruction_chars))
        except EditInputError as error:
            raise ApiError(422, error.code, f"item {index}: {error.message}", item=index) from error
    return specs


def request_fingerprint(job_in: JobCreate) -> str:
    """sha256 (hex) of the canonical JSON of the submission as validated (defaults filled in, URL normalised),
    without its idempotency key: two bodies that mean the same job have the same fingerprint."""
    body = job_in.model_dump(mode="json", exclude={"idempotency_key"})
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
