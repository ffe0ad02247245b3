"""Schedules of dataset augmentation: create, read, change, pause, delete, fire now, and their runs' history.

A schedule is checked with the rules of ``xmgie.jobs.schedules`` (the same ones ``xmgie augment`` applies), and a
change is checked as a whole: the merged schedule must be one that could have been created. Only the tenant's own
schedules exist: another tenant's is ``404 schedule_not_found``, never 403.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Query, Response, status
from pydantic import ValidationError
from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import CurrentTenant, PublisherDep, SessionDep, SettingsDep
from api.errors import ApiError
from api.schemas import (
    ErrorResponse,
    RunCounts,
    RunError,
    RunPublic,
    RunsPublic,
    ScheduleCreate,
    ScheduleInstruction,
    SchedulePublic,
    SchedulesPublic,
    ScheduleUpdate,
    SourceImages,
    SourcePrefix,
)
from xmgie.jobs.dispatch import START_RUN_TASK
from xmgie.jobs.models import Job, Run, Schedule, utc_now
from xmgie.jobs.runs import fire_now
from xmgie.jobs.schedules import (
    METADATA_FILE,
    ScheduleError,
    check_options,
    check_source_images,
    check_source_prefix,
    check_target_prefix,
    check_timing,
    check_variants,
    latest_slot,
    next_slot,
    parse_instructions,
)
from xmgie.jobs.settings import Settings
from xmgie.jobs.statuses import JobStatus

logger = logging.getLogger(__name__)

router = APIRouter(
    prefix="/schedules",
    tags=["schedules"],
    responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
)

DEFAULT_RUNS_PAGE_SIZE = 50
"""Runs per page when the client names no ``limit``."""

MAX_RUNS_PAGE_SIZE = 500
"""Largest ``limit`` a client may ask for."""

_TIMING_FIELDS = frozenset({"cron", "interval_seconds", "timezone"})


# --- Rows and views ------------------------------------------------------------------------------------------------


def _tenant_schedule(session: Session, tenant_id: UUID, schedule_id: UUID) -> Schedule:
    """The tenant's schedule; another tenant's is reported as missing, never as forbidden."""
    query = select(Schedule).where(Schedule.id == schedule_id, Schedule.tenant_id == tenant_id)
    schedule = session.execute(query).scalar_one_or_none()
    if schedule is None:
        raise ApiError(404, "schedule_not_found", f"no schedule {schedule_id}")
    return schedule


def _schedule_view(schedule: Schedule, now: datetime | None = None) -> SchedulePublic:
    upcoming = None
    if schedule.enabled:
        upcoming = next_slot(
            cron=schedule.cron,
            interval_seconds=schedule.interval_seconds,
            timezone=schedule.timezone,
            anchor=schedule.created_at,
            now=now or utc_now(),
        )
    source: SourcePrefix | SourceImages
    if schedule.source_keys is not None:
        source = SourceImages(images=list(schedule.source_keys))
    else:
        source = SourcePrefix(prefix=schedule.source_prefix or "")
    return SchedulePublic(
        id=schedule.id,
        name=schedule.name,
        cron=schedule.cron,
        interval_seconds=schedule.interval_seconds,
        timezone=schedule.timezone,
        source=source,
        instructions=[ScheduleInstruction(**entry) for entry in schedule.instructions],
        variants=schedule.variants,
        target_prefix=schedule.target_prefix,
        options=schedule.options or {},
        enabled=schedule.enabled,
        last_slot=schedule.last_slot,
        next_slot=upcoming,
        dataset=f"{schedule.target_prefix}{METADATA_FILE}",
        created_at=schedule.created_at,
        updated_at=schedule.updated_at,
    )


def _run_status(run: Run, job: Job | None) -> JobStatus:
    """The run's row is final once published; until then a run with a job is where its job is, and a run whose
    job has ended but is not published yet is still ``running`` (its dataset is being written)."""
    if run.published_at is not None or job is None:
        return JobStatus(run.status)
    status_ = JobStatus(job.status)
    return JobStatus.RUNNING if status_.is_terminal() else status_


def _run_view(run: Run, job: Job | None) -> RunPublic:
    if job is not None:
        counts = RunCounts(**{status_.value: number for status_, number in job.counts.items()})
    else:
        counts = RunCounts(queued=0, running=0, succeeded=run.succeeded_count, failed=run.failed_count, canceled=0)
    return RunPublic(
        id=run.id,
        schedule_id=run.schedule_id,
        slot=run.slot,
        trigger=run.trigger,
        status=_run_status(run, job),
        job_id=run.job_id,
        fingerprint=run.fingerprint,
        image_count=run.image_count,
        item_count=run.item_count,
        counts=counts,
        error=RunError(code=run.error_code, message=run.error_message) if run.error_code else None,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        published_at=run.published_at,
    )


# --- Checks --------------------------------------------------------------------------------------------------------


def _checked_columns(body: ScheduleCreate, tenant_id: UUID, settings: Settings) -> dict[str, Any]:
    """The schedule's column values once every rule holds; ``ScheduleError`` (422 with its code) otherwise."""
    check_timing(body.cron, body.interval_seconds, body.timezone)
    source = body.source
    if (source.prefix is None) == (source.images is None):
        raise ScheduleError("invalid_source", "give the source as either prefix or images, not both and not neither")
    source_prefix = check_source_prefix(source.prefix, tenant_id) if source.prefix is not None else None
    source_keys = check_source_images(source.images, tenant_id) if source.images is not None else None
    options = check_options(body.options, "options")
    raw = [entry if isinstance(entry, str) else entry.model_dump() for entry in body.instructions]
    instructions = parse_instructions(raw, options, settings.max_instruction_chars)
    return {
        "name": body.name,
        "cron": body.cron,
        "interval_seconds": body.interval_seconds,
        "timezone": body.timezone,
        "source_prefix": source_prefix,
        "source_keys": source_keys,
        "instructions": [instruction.as_dict() for instruction in instructions],
        "variants": check_variants(body.variants),
        "target_prefix": check_target_prefix(
            body.target_prefix, tenant_id, source_prefix=source_prefix, source_keys=source_keys or ()
        ),
        "options": options,
        "enabled": body.enabled,
    }


def _as_create(schedule: Schedule) -> dict[str, Any]:
    """A stored schedule in the shape of a creation body (what a change is merged into)."""
    if schedule.source_keys is not None:
        source: dict[str, Any] = {"images": schedule.source_keys}
    else:
        source = {"prefix": schedule.source_prefix}
    return {
        "name": schedule.name,
        "cron": schedule.cron,
        "interval_seconds": schedule.interval_seconds,
        "timezone": schedule.timezone,
        "source": source,
        "instructions": schedule.instructions,
        "variants": schedule.variants,
        "target_prefix": schedule.target_prefix,
        "options": schedule.options or {},
        "enabled": schedule.enabled,
    }


def _name_taken(session: Session, tenant_id: UUID, name: str, other_than: UUID | None = None) -> bool:
    query = select(Schedule.id).where(Schedule.tenant_id == tenant_id, Schedule.name == name)
    if other_than is not None:
        query = query.where(Schedule.id != other_than)
    return session.execute(query.limit(1)).first() is not None


def _schedule_exists(name: str) -> ApiError:
    return ApiError(409, "schedule_exists", f"a schedule named {name!r} exists already")


def _commit_or_conflict(session: Session, name: str) -> None:
    """Commit; a concurrent schedule of the same name (the unique constraint) is a 409."""
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise _schedule_exists(name) from None


def _skip_passed_slots(schedule: Schedule, now: datetime) -> None:
    """Count the slots that have passed as fired, so an enabled schedule fires next at its ``next_slot``: slots
    passed while it was paused, or under its former timing, do not fire when it is resumed or retimed."""
    passed = latest_slot(
        cron=schedule.cron,
        interval_seconds=schedule.interval_seconds,
        timezone=schedule.timezone,
        anchor=schedule.created_at,
        now=now,
    )
    if passed is not None and (schedule.last_slot is None or passed > schedule.last_slot):
        schedule.last_slot = passed


def _set_enabled(session: Session, tenant_id: UUID, schedule_id: UUID, enabled: bool) -> SchedulePublic:
    schedule = _tenant_schedule(session, tenant_id, schedule_id)
    now = utc_now()
    if enabled and not schedule.enabled:
        _skip_passed_slots(schedule, now)
    schedule.enabled = enabled
    schedule.updated_at = now
    session.commit()
    return _schedule_view(schedule, now)


# --- Routes --------------------------------------------------------------------------------------------------------


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=SchedulePublic,
    responses={409: {"model": ErrorResponse, "description": "the tenant has a schedule of that name"}},
)
def create_schedule(
    body: ScheduleCreate, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep
) -> SchedulePublic:
    """Create a schedule; its first slot is the first one after now."""
    columns = _checked_columns(body, tenant.id, settings)
    if _name_taken(session, tenant.id, body.name):
        raise _schedule_exists(body.name)
    now = utc_now()
    schedule = Schedule(tenant_id=tenant.id, created_at=now, updated_at=now, last_slot=None, **columns)
    session.add(schedule)
    _commit_or_conflict(session, body.name)
    return _schedule_view(schedule, now)


@router.get("", response_model=SchedulesPublic)
def list_schedules(session: SessionDep, tenant: CurrentTenant) -> SchedulesPublic:
    """The tenant's schedules, by name."""
    schedules = list(session.scalars(select(Schedule).where(Schedule.tenant_id == tenant.id).order_by(Schedule.name)))
    now = utc_now()
    return SchedulesPublic(data=[_schedule_view(schedule, now) for schedule in schedules], count=len(schedules))


@router.get("/{schedule_id}", response_model=SchedulePublic)
def read_schedule(schedule_id: UUID, session: SessionDep, tenant: CurrentTenant) -> SchedulePublic:
    """A schedule with its last and next slot and the key of its dataset manifest."""
    return _schedule_view(_tenant_schedule(session, tenant.id, schedule_id))


@router.patch("/{schedule_id}", response_model=SchedulePublic, responses={409: {"model": ErrorResponse}})
def update_schedule(
    schedule_id: UUID, body: ScheduleUpdate, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep
) -> SchedulePublic:
    """Change any of a schedule's fields; the result is checked as a whole, like a new schedule.

    New instructions, variants or options change the schedule's fingerprint: its next run edits every image again.
    """
    schedule = _tenant_schedule(session, tenant.id, schedule_id)
    changes = body.model_dump(exclude_unset=True)
    try:
        merged = ScheduleCreate.model_validate({**_as_create(schedule), **changes})
    except ValidationError as error:
        raise ApiError(422, "invalid_request", str(error)) from None
    columns = _checked_columns(merged, tenant.id, settings)
    if columns["name"] != schedule.name and _name_taken(session, tenant.id, columns["name"], schedule.id):
        raise _schedule_exists(columns["name"])
    was_enabled = schedule.enabled
    retimed = any(columns[name] != getattr(schedule, name) for name in _TIMING_FIELDS)
    for name, value in columns.items():
        setattr(schedule, name, value)
    now = utc_now()
    if schedule.enabled and (retimed or not was_enabled):
        _skip_passed_slots(schedule, now)
    schedule.updated_at = now
    _commit_or_conflict(session, columns["name"])
    return _schedule_view(schedule, now)


@router.delete("/{schedule_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
def delete_schedule(schedule_id: UUID, session: SessionDep, tenant: CurrentTenant) -> Response:
    """Delete a schedule with its runs' history; the jobs it created and the dataset it published stay."""
    schedule = _tenant_schedule(session, tenant.id, schedule_id)
    session.delete(schedule)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{schedule_id}/pause", response_model=SchedulePublic)
def pause_schedule(schedule_id: UUID, session: SessionDep, tenant: CurrentTenant) -> SchedulePublic:
    """Stop firing on the schedule's slots (``POST .../run`` still works)."""
    return _set_enabled(session, tenant.id, schedule_id, False)


@router.post("/{schedule_id}/resume", response_model=SchedulePublic)
def resume_schedule(schedule_id: UUID, session: SessionDep, tenant: CurrentTenant) -> SchedulePublic:
    """Fire on the schedule's slots again, from the next one (slots passed while paused do not fire)."""
    return _set_enabled(session, tenant.id, schedule_id, True)


@router.post("/{schedule_id}/run", status_code=status.HTTP_202_ACCEPTED, response_model=RunPublic)
def run_schedule(schedule_id: UUID, session: SessionDep, tenant: CurrentTenant, publisher: PublisherDep) -> RunPublic:
    """Fire the schedule now (also while paused): the run is recorded, then started by a worker."""
    schedule = _tenant_schedule(session, tenant.id, schedule_id)
    run = fire_now(session=session, schedule_id=schedule.id)
    session.commit()
    try:
        publisher.send(START_RUN_TASK, [str(run.id)])
    except Exception:
        # The run is committed: the dispatcher starts runs that have no job after a while.
        logger.exception("publishing the start of run %s failed; the dispatcher starts it later", run.id)
    return _run_view(run, None)


@router.get("/{schedule_id}/runs", response_model=RunsPublic)
def list_runs(
    schedule_id: UUID,
    session: SessionDep,
    tenant: CurrentTenant,
    cursor: Annotated[UUID | None, Query(description="the next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_RUNS_PAGE_SIZE)] = DEFAULT_RUNS_PAGE_SIZE,
) -> RunsPublic:
    """The schedule's runs, newest first, with their counts (live from the job while it runs)."""
    schedule = _tenant_schedule(session, tenant.id, schedule_id)
    count = session.scalar(select(func.count()).select_from(Run).where(Run.schedule_id == schedule.id)) or 0
    query = select(Run, Job).outerjoin(Job, Job.id == Run.job_id).where(Run.schedule_id == schedule.id)
    if cursor is not None:
        after = session.execute(
            select(Run.created_at, Run.id).where(Run.id == cursor, Run.schedule_id == schedule.id)
        ).first()
        if after is None:
            raise ApiError(422, "invalid_cursor", f"{cursor} is not a run of this schedule")
        query = query.where(
            or_(Run.created_at < after.created_at, and_(Run.created_at == after.created_at, Run.id < after.id))
        )
    rows = session.execute(query.order_by(Run.created_at.desc(), Run.id.desc()).limit(limit + 1)).all()
    page = rows[:limit]
    next_cursor = page[-1][0].id if len(rows) > limit else None
    return RunsPublic(data=[_run_view(run, job) for run, job in page], count=count, next_cursor=next_cursor)
