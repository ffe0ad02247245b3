"""Checks a job submission item by item and turns it into ``ItemSpec`` rows; errors name the offending item."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

from api.errors import ApiError
from api.schemas import ItemCreate, JobCreate
from xmgie.editing.errors import EditInputError
from xmgie.editing.images import check_instruction
from xmgie.editing.options import EditOptions
from xmgie.jobs.settings import Settings
from xmgie.jobs.storage import Storage
from xmgie.jobs.transitions import ItemSpec
from xmgie.jobs.uploads import resolve_upload


def merge_options(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``; option groups given as objects on both sides are merged key by key."""
    merged = dict(base)
    for name, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(name), Mapping):
            merged[name] = merge_options(merged[name], value)
        else:
            merged[name] = value
    return merged


def _item_spec(
    item: ItemCreate, job_options: Mapping[str, Any], *, tenant_id: UUID, storage: Storage, limit: int
) -> ItemSpec:
    instruction = check_instruction(item.instruction)
    if len(instruction) > limit:
        raise EditInputError(
            "instruction_too_long", f"instruction has {len(instruction)} characters; at most {limit} are allowed"
        )
    options = merge_options(job_options, item.options)
    try:
        EditOptions.from_dict(options)
    except EditInputError:
        raise
    except (TypeError, ValueError) as error:
        raise EditInputError("invalid_option", f"options are invalid: {error}") from error

    def resolve(reference: str | None) -> str | None:
        return None if reference is None else resolve_upload(storage=storage, tenant_id=tenant_id, reference=reference)

    return ItemSpec(
        input_key=resolve(item.image) or "",
        instruction=instruction,
        mask_key=resolve(item.mask),
        identity_key=resolve(item.identity_image),
        options=options,
        seed=item.seed,
    )


def item_specs(*, job_in: JobCreate, tenant_id: UUID, storage: Storage, settings: Settings) -> list[ItemSpec]:
    """The items to create, each with the job's options merged under its own (stored merged, validated).

    Raises ``ApiError`` 422: ``too_many_items``, or the first bad item's code (``empty_instruction``,
    ``instruction_too_long``, ``invalid_option``, ``unknown_upload``) with its index.
    """
    if len(job_in.items) > settings.max_items_per_job:
        raise ApiError(
            422,
            "too_many_items",
            f"a job has at most {settings.max_items_per_job} items, this one has {len(job_in.items)}",
        )
    specs = []
    for index, item in enumerate(job_in.items):
        try:
            specs.append(
                _item_spec(
                    item,
                    job_in.options,
                    tenant_id=tenant_id,
                    storage=storage,
                    limit=settings.max_instruction_chars,
                )
            )
        except EditInputError as error:
            raise ApiError(422, error.code, f"item {index}: {error.message}", item=index) from error
    return specs
