"""Processing of claimed items: the one code path shared by worker tasks and ``xmgie batch``.

``process_items`` takes item ids (a queue message, or a slice of a local job), claims each one, loads and checks
its inputs, edits the valid ones as one micro-batch and records every outcome through ``xmgie.jobs.transitions``.
Bad input fails its own item (no retry, with the input error's code); an unexpected failure of the editor puts the
batch's items back in the queue while they have attempts left (``internal_error`` after the last one). Nothing is
raised to the caller for a problem of an item. When a job has no queued or running items left, its results
manifest is (re)written and, if it is the job of an augmentation run, the run is published.

Outages are ridden through rather than charged to the items: every database step is retried on a fresh connection
for ``Settings.database_retry_seconds`` (the item keeps its lease; a claim or result that committed unseen is
recognised), the write of an edited image is retried in place with backoff for ``Settings.storage_retry_seconds``
(renewing the lease), and an item whose inputs cannot be read is given back without spending an attempt when the
caller passes a ``StorageDeferral`` (it then publishes the item again after ``ItemOutcome.retry_after_seconds``).

Each transition runs in its own short transaction; the model runs outside any transaction, so the database is
never locked while images are edited. The editor's model is loaded before anything is claimed, and the claimed
items' leases are renewed by a ``LeaseHeartbeat`` until their outcomes are recorded, so a lease only has to outlast
a dead worker's silence, not the slowest edit; an item whose lease was lost meanwhile keeps the new holder's result.
"""

from __future__ import annotations

import io
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from xmgie.editing.errors import EditInputError
from xmgie.editing.images import check_instruction, load_image, load_mask
from xmgie.editing.options import EditOptions
from xmgie.jobs import runs, transitions
from xmgie.jobs.db import retry_while_unavailable
from xmgie.jobs.editor import Editor, EditRequest, EditResult, load_editor
from xmgie.jobs.exceptions import LeaseLostError, NoSuchItemError
from xmgie.jobs.leases import LeaseHeartbeat
from xmgie.jobs.manifests import write_results_manifest
from xmgie.jobs.models import Item, Job, utc_now
from xmgie.jobs.settings import Settings
from xmgie.jobs.statuses import ItemStatus, JobStatus
from xmgie.jobs.storage import InvalidKeyError, ObjectNotFoundError, Storage, StorageError, mask_key, output_key

logger = logging.getLogger(__name__)

INTERNAL_ERROR = "internal_error"
STORAGE_ERROR = "storage_error"
IMAGE_NOT_FOUND = "image_not_found"
IMAGE_TOO_LARGE = "image_too_large"
SKIPPED = "skipped"
"""Outcome status of an item this call did not take (finished, held by another worker, or job canceled)."""
DEFERRED = "deferred"
"""Outcome status of an item given back to the queue without spending an attempt (its storage was unreachable)."""
STORAGE_RETRY_FIRST_DELAY_SECONDS = 1.0
"""First pause before a storage operation is tried again; each next one doubles up to the settings' maximum."""

SessionFactory = Callable[[], Session]
T = TypeVar("T")


def storage_retry_delay(retries: int, max_delay: float) -> float:
    """Seconds to wait before try number ``retries + 1`` of a storage operation: 1 s doubling per try, capped at
    ``max_delay``, jittered to 50-100 % so that items failed together do not come back together."""
    return min(max_delay, STORAGE_RETRY_FIRST_DELAY_SECONDS * 2 ** min(retries, 32)) * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class StorageDeferral:
    """How ``process_items`` may give back items whose inputs the storage could not serve: ``done`` deferrals of
    these items' message so far, at most ``Settings.storage_deferrals``, each pause at most ``max_delay_seconds``
    (a worker keeps a scheduled message unacknowledged, so keep it under the broker's redelivery timeout)."""

    done: int
    max_delay_seconds: float


@dataclass(frozen=True)
class ItemOutcome:
    """What ``process_items`` did with one item.

    ``status`` is the item's status after this call (``succeeded``, ``failed``, ``canceled``, or ``queued`` when a
    retryable failure sent it back), or ``skipped`` when this call did not claim it.
    """

    item_id: uuid.UUID
    status: str
    job_id: uuid.UUID | None = None
    index: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    retry_after_seconds: float | None = None
    """For a ``deferred`` item: when to publish it again."""


@dataclass
class _Claimed:
    """The fields of a claimed item this module needs, copied out of its transaction."""

    id: uuid.UUID
    job_id: uuid.UUID
    index: int
    input_key: str
    instruction: str
    mask_key: str | None
    identity_key: str | None
    options: dict[str, Any]
    seed: int | None
    request: EditRequest | None = None
    load_seconds: float = 0.0
    outcome: ItemOutcome | None = field(default=None)
    lease_lost: bool = False
    """Set by the lease heartbeat: another worker or the reconciler took the item while this one worked on it."""


@contextmanager
def _transaction(session_factory: SessionFactory) -> Iterator[Session]:
    """A session whose transaction commits when the block ends normally and rolls back when it raises."""
    with session_factory() as session, session.begin():
        yield session


def _in_transaction(session_factory: SessionFactory, settings: Settings, what: str, work: Callable[[Session], T]) -> T:
    """``work(session)`` in its own transaction, run again on a fresh connection while the database is unreachable
    (for at most ``settings.database_retry_seconds``)."""

    def attempt() -> T:
        with _transaction(session_factory) as session:
            return work(session)

    return retry_while_unavailable(attempt, give_up_after=settings.database_retry_seconds, what=what)


def item_seed(item_id: uuid.UUID, seed: int | None, options: EditOptions) -> int:
    """The item's seed, else the options' seed, else one derived from the item's id (stable across retries)."""
    if seed is not None:
        return seed
    if options.seed is not None:
        return options.seed
    return item_id.int % (2**31)


def process_items(
    *,
    session_factory: SessionFactory,
    storage: Storage,
    editor: Editor,
    item_ids: Sequence[uuid.UUID],
    worker: str,
    settings: Settings,
    on_jobs_finished: Callable[[list[uuid.UUID]], None] | None = None,
    storage_deferral: StorageDeferral | None = None,
) -> list[ItemOutcome]:
    """Claim, load, edit and record ``item_ids`` as one micro-batch; one outcome per id, in order.

    Never raises for a problem of an item (bad input, editor failure, storage failure, lost lease); a database that
    stays unreachable past ``settings.database_retry_seconds`` is the caller's (the items keep their leases: the
    same worker takes them up again with its next delivery, or the reconciler after the lease). An item whose
    inputs cannot be read is ``deferred`` (no attempt spent) while ``storage_deferral`` allows it, else it spends
    an attempt.
    ``on_jobs_finished(job_ids)`` is called with the jobs of these items that have ended, if any, after their
    manifests are written (the workers publish their webhooks there). Once the outcomes are recorded nothing raises:
    a failure of what follows them (manifests, runs, ``on_jobs_finished``) is logged and left to the sweeps, so a
    caller never takes a recorded result for an unfinished one.
    """
    outcomes: dict[uuid.UUID, ItemOutcome] = {}
    claimed: list[_Claimed] = []
    load_editor(editor)
    for item_id in dict.fromkeys(item_ids):
        try:
            entry = _claim(session_factory, item_id, worker, settings)
        except NoSuchItemError as error:
            outcomes[item_id] = ItemOutcome(item_id, SKIPPED, error_code="no_such_item", error_message=str(error))
            continue
        if entry is None:
            outcomes[item_id] = ItemOutcome(item_id=item_id, status=SKIPPED)
        else:
            claimed.append(entry)

    with _heartbeat(session_factory, claimed, worker, settings):
        for entry in claimed:
            started = time.perf_counter()
            try:
                entry.request = _load_request(entry, storage, settings)
            except EditInputError as error:
                entry.outcome = _fail(session_factory, entry, worker, settings, error.code, error.message, retry=False)
            except StorageError as error:
                if _may_defer(error, settings, storage_deferral):
                    assert storage_deferral is not None
                    entry.outcome = _defer(session_factory, entry, worker, settings, str(error), storage_deferral)
                else:
                    entry.outcome = _fail(
                        session_factory, entry, worker, settings, STORAGE_ERROR, str(error), retry=True
                    )
            except Exception as error:  # noqa: BLE001 - one item's surprise must not cost its neighbours
                logger.exception("loading item %s failed", entry.id)
                entry.outcome = _fail(session_factory, entry, worker, settings, INTERNAL_ERROR, _describe(error), True)
            entry.load_seconds = time.perf_counter() - started

        ready = [entry for entry in claimed if entry.outcome is None]
        ready = _drop_canceled(session_factory, ready, worker, settings)
        ready = _drop_lost(ready)
        if ready:
            _edit_and_record(session_factory, storage, editor, ready, worker, settings)

    for entry in claimed:
        assert entry.outcome is not None
        outcomes[entry.id] = entry.outcome
    finished = _write_finished_manifests(session_factory, storage, settings, list(outcomes))
    if finished and on_jobs_finished is not None:
        try:
            on_jobs_finished(finished)
        except Exception:  # noqa: BLE001 - the outcomes are recorded; the reconciler publishes what is left pending
            logger.exception("announcing the end of jobs %s failed", finished)
    return [outcomes[item_id] for item_id in item_ids]


def _heartbeat(
    session_factory: SessionFactory, claimed: list[_Claimed], worker: str, settings: Settings
) -> LeaseHeartbeat:
    """The heartbeat of the claimed items' leases; it marks an item whose lease was lost (unless already ended)."""
    by_id = {entry.id: entry for entry in claimed}

    def on_lost(item_id: uuid.UUID) -> None:
        entry = by_id[item_id]
        if entry.outcome is None:
            entry.lease_lost = True

    return LeaseHeartbeat(
        session_factory=session_factory,
        item_ids=list(by_id),
        worker=worker,
        lease_seconds=settings.lease_seconds,
        on_lost=on_lost,
    )


def _drop_lost(entries: list[_Claimed]) -> list[_Claimed]:
    """The entries whose lease is still held; the others are skipped (their new holder does them)."""
    keep = []
    for entry in entries:
        if entry.lease_lost:
            logger.warning("item %s: lease lost before the edit; left to its new holder", entry.id)
            entry.outcome = ItemOutcome(entry.id, SKIPPED, entry.job_id, entry.index)
        else:
            keep.append(entry)
    return keep


def _claim(session_factory: SessionFactory, item_id: uuid.UUID, worker: str, settings: Settings) -> _Claimed | None:
    """Take the item's lease (again, when a claim of this worker committed unseen); its fields, or None when it is
    not this worker's to run."""

    def claim(session: Session) -> _Claimed | None:
        item = transitions.claim_item(
            session=session,
            item_id=item_id,
            worker=worker,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
        )
        if item is None:
            return None
        return _Claimed(
            id=item.id,
            job_id=item.job_id,
            index=item.index,
            input_key=item.input_key,
            instruction=item.instruction,
            mask_key=item.mask_key,
            identity_key=item.identity_key,
            options=dict(item.options or {}),
            seed=item.seed,
        )

    return _in_transaction(session_factory, settings, f"claiming item {item_id}", claim)


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _fail(
    session_factory: SessionFactory,
    entry: _Claimed,
    worker: str,
    settings: Settings,
    code: str,
    message: str,
    retry: bool,
) -> ItemOutcome:
    """Record a failed attempt of ``entry`` and return its outcome (``skipped`` if the lease was lost)."""

    def fail(session: Session) -> str:
        item = transitions.fail_item(
            session=session,
            item_id=entry.id,
            worker=worker,
            code=code,
            message=message,
            retry=retry,
            max_attempts=settings.max_attempts,
        )
        return item.status

    try:
        status = _in_transaction(session_factory, settings, f"recording the failure of item {entry.id}", fail)
    except LeaseLostError:
        logger.warning("item %s: lease lost before its failure (%s) was recorded", entry.id, code)
        return ItemOutcome(item_id=entry.id, status=SKIPPED, job_id=entry.job_id, index=entry.index)
    return ItemOutcome(entry.id, status, entry.job_id, entry.index, error_code=code, error_message=message)


def _may_defer(error: StorageError, settings: Settings, deferral: StorageDeferral | None) -> bool:
    """Whether a storage failure may give the item back without spending an attempt: an outage, not a bad key."""
    if deferral is None or deferral.done >= settings.storage_deferrals:
        return False
    return not isinstance(error, InvalidKeyError | ObjectNotFoundError)


def _defer(
    session_factory: SessionFactory,
    entry: _Claimed,
    worker: str,
    settings: Settings,
    message: str,
    deferral: StorageDeferral,
) -> ItemOutcome:
    """Give ``entry`` back to the queue for later without spending its attempt; its outcome (``deferred``)."""
    delay = storage_retry_delay(deferral.done, deferral.max_delay_seconds)

    def defer(session: Session) -> str:
        item = transitions.defer_item(
            session=session,
            item_id=entry.id,
            worker=worker,
            code=STORAGE_ERROR,
            message=message,
            not_before=utc_now() + timedelta(seconds=delay),
        )
        return item.status

    try:
        status = _in_transaction(session_factory, settings, f"deferring item {entry.id}", defer)
    except LeaseLostError:
        logger.warning("item %s: lease lost before its deferral was recorded", entry.id)
        return ItemOutcome(item_id=entry.id, status=SKIPPED, job_id=entry.job_id, index=entry.index)
    logger.warning("item %s: storage unavailable (%s); trying again in %.1f s", entry.id, message, delay)
    if status != ItemStatus.QUEUED.value:
        return ItemOutcome(entry.id, status, entry.job_id, entry.index)
    return ItemOutcome(
        entry.id, DEFERRED, entry.job_id, entry.index, STORAGE_ERROR, message, retry_after_seconds=delay
    )


def _load_request(entry: _Claimed, storage: Storage, settings: Settings) -> EditRequest:
    """Read and check the item's inputs; ``EditInputError`` with a stable code for anything a user can fix."""
    options = EditOptions.from_dict(entry.options)
    instruction = check_instruction(entry.instruction, settings.max_instruction_chars)
    image = _load_checked(storage, entry.input_key, "image", settings)
    mask = None
    if entry.mask_key is not None:
        mask = load_mask(_read_object(storage, entry.mask_key, "mask"), image.size)
    identity = None
    if entry.identity_key is not None:
        identity = _load_checked(storage, entry.identity_key, "identity image", settings)
    seed = item_seed(entry.id, entry.seed, options)
    return EditRequest(
        image=image, instruction=instruction, options=options, seed=seed, mask=mask, identity_image=identity
    )


def _read_object(storage: Storage, key: str, what: str) -> bytes:
    try:
        return storage.get_bytes(key)
    except ObjectNotFoundError:
        raise EditInputError(IMAGE_NOT_FOUND, f"{what} not found in storage: {key}") from None


def _load_checked(storage: Storage, key: str, what: str, settings: Settings) -> Image.Image:
    """Decode the image under ``key``, refusing more pixels than ``settings.max_image_pixels`` before decoding."""
    data = _read_object(storage, key, what)
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except Exception:  # noqa: BLE001 - unreadable data: load_image names the exact problem below
        width = height = 0
    if width * height > settings.max_image_pixels:
        raise EditInputError(
            IMAGE_TOO_LARGE,
            f"{what} {key} is {width}x{height} ({width * height} pixels); at most {settings.max_image_pixels} "
            "are allowed",
        )
    return load_image(data)


def _drop_canceled(
    session_factory: SessionFactory, entries: list[_Claimed], worker: str, settings: Settings
) -> list[_Claimed]:
    """Cancel the claimed items whose job was asked to cancel meanwhile; the others."""

    def canceled(session: Session) -> set[uuid.UUID]:
        job_ids = {entry.job_id for entry in entries}
        return {job_id for job_id in job_ids if transitions.is_cancel_requested(session=session, job_id=job_id)}

    canceled_jobs = _in_transaction(session_factory, settings, "checking for cancel requests", canceled)
    keep = []
    for entry in entries:
        if entry.job_id not in canceled_jobs:
            keep.append(entry)
            continue
        try:
            _in_transaction(
                session_factory,
                settings,
                f"canceling item {entry.id}",
                lambda session, entry=entry: transitions.cancel_item(session=session, item_id=entry.id, worker=worker),
            )
            entry.outcome = ItemOutcome(entry.id, "canceled", entry.job_id, entry.index)
        except LeaseLostError:
            entry.outcome = ItemOutcome(entry.id, SKIPPED, entry.job_id, entry.index)
    return keep


def _edit_and_record(
    session_factory: SessionFactory,
    storage: Storage,
    editor: Editor,
    entries: list[_Claimed],
    worker: str,
    settings: Settings,
) -> None:
    """Edit ``entries`` as one micro-batch and record each result; failures fail the batch's items."""
    requests = [entry.request for entry in entries if entry.request is not None]
    try:
        results = editor.edit(requests)
        if len(results) != len(requests):
            raise RuntimeError(f"the editor returned {len(results)} results for {len(requests)} requests")
    except EditInputError as error:
        if len(entries) > 1:
            # One item's input the editor refused: edit each alone so the others still get their results.
            for entry in entries:
                _edit_and_record(session_factory, storage, editor, [entry], worker, settings)
            return
        entries[0].outcome = _fail(session_factory, entries[0], worker, settings, error.code, error.message, False)
        return
    except Exception as error:  # noqa: BLE001 - the batch's items are retried; the caller keeps running
        logger.exception("editing %d item(s) failed", len(entries))
        for entry in entries:
            entry.outcome = _fail(session_factory, entry, worker, settings, INTERNAL_ERROR, _describe(error), True)
        return
    for entry, result in zip(entries, results, strict=True):
        entry.outcome = _record(session_factory, storage, entry, result, worker, settings)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _record(
    session_factory: SessionFactory,
    storage: Storage,
    entry: _Claimed,
    result: EditResult,
    worker: str,
    settings: Settings,
) -> ItemOutcome:
    """Write the item's output (and mask) to their deterministic keys and mark it succeeded; nothing is written when
    the lease was lost during the edit (the new holder writes the same keys and records its own checksum)."""
    if entry.lease_lost:
        logger.warning("item %s: lease lost during the edit; its result is dropped", entry.id)
        return ItemOutcome(entry.id, SKIPPED, entry.job_id, entry.index)
    try:
        key = output_key(entry.job_id, entry.index)
        sha256 = _put_retrying(session_factory, storage, entry, key, _png(result.image), worker, settings)
        used_mask_key = None
        if result.mask is not None:
            used_mask_key = mask_key(entry.job_id, entry.index)
            mask_png = _png(result.mask.convert("L"))
            _put_retrying(session_factory, storage, entry, used_mask_key, mask_png, worker, settings)
    except LeaseLostError:
        logger.warning("item %s: lease lost while its output could not be written", entry.id)
        return ItemOutcome(entry.id, SKIPPED, entry.job_id, entry.index)
    except Exception as error:  # noqa: BLE001 - a write failure is retried like any transient failure
        return _fail(session_factory, entry, worker, settings, STORAGE_ERROR, _describe(error), retry=True)
    metrics = {
        "identity_score": result.identity_score,
        "preservation": result.preservation,
        "edit_scope": result.edit_scope,
        "mask_fraction": result.mask_fraction,
    }
    timings = {**result.timings, "load": round(entry.load_seconds, 4)}

    def succeed(session: Session) -> None:
        transitions.succeed_item(
            session=session,
            item_id=entry.id,
            worker=worker,
            output_key=key,
            output_sha256=sha256,
            mask_output_key=used_mask_key,
            expressive_instruction=result.expressive_instruction,
            metrics=metrics,
            timings=timings,
        )

    try:
        _in_transaction(session_factory, settings, f"recording the result of item {entry.id}", succeed)
    except LeaseLostError:
        if _recorded_as(session_factory, settings, entry.id, sha256):
            # A retry after a commit whose answer the dropped connection lost: the result is already ours.
            return ItemOutcome(entry.id, "succeeded", entry.job_id, entry.index)
        logger.warning("item %s: lease lost before its result was recorded", entry.id)
        return ItemOutcome(entry.id, SKIPPED, entry.job_id, entry.index)
    return ItemOutcome(entry.id, "succeeded", entry.job_id, entry.index)


def _recorded_as(session_factory: SessionFactory, settings: Settings, item_id: uuid.UUID, sha256: str) -> bool:
    """Whether the item has succeeded with the output ``sha256``."""

    def read(session: Session) -> bool:
        item = session.get(Item, item_id)
        return item is not None and item.status == ItemStatus.SUCCEEDED.value and item.output_sha256 == sha256

    return _in_transaction(session_factory, settings, f"reading item {item_id}", read)


def _put_retrying(
    session_factory: SessionFactory,
    storage: Storage,
    entry: _Claimed,
    key: str,
    data: bytes,
    worker: str,
    settings: Settings,
) -> str:
    """``storage.put_bytes`` of an edited image, tried again with growing jittered pauses for at most
    ``settings.storage_retry_seconds`` while the storage fails, renewing the item's lease between tries so an
    outage longer than the lease does not hand the finished edit to another worker. Raises the last storage
    error, or ``LeaseLostError`` if the lease was taken back meanwhile."""
    deadline = time.monotonic() + settings.storage_retry_seconds
    retries = 0
    while True:
        try:
            return storage.put_bytes(key, data, "image/png")
        except StorageError as error:
            delay = storage_retry_delay(retries, settings.storage_retry_max_delay_seconds)
            if isinstance(error, InvalidKeyError) or time.monotonic() + delay > deadline:
                raise
            logger.warning("item %s: writing %s failed (%s); trying again in %.1f s", entry.id, key, error, delay)
        time.sleep(delay)
        retries += 1
        held = _in_transaction(
            session_factory,
            settings,
            f"renewing the lease of item {entry.id}",
            lambda session: transitions.renew_leases(
                session=session, item_ids=[entry.id], worker=worker, lease_seconds=settings.lease_seconds
            ),
        )
        if not held:
            raise LeaseLostError(f"worker {worker!r} no longer holds item {entry.id}")


def _write_finished_manifests(
    session_factory: SessionFactory, storage: Storage, settings: Settings, item_ids: list[uuid.UUID]
) -> list[uuid.UUID]:
    """Write the results manifest of each job of ``item_ids`` that has no queued or running items left (and publish
    its augmentation run, if it is one); those jobs. Runs after the items' outcomes are recorded, so nothing here
    raises: a database outage outlasting its retries leaves the manifests to the database (the API reads them from
    it until one is stored) and the runs to the schedule dispatcher's sweep, and an empty list is returned."""
    if not item_ids:
        return []
    query = select(Job.id, Job.status).where(Job.id.in_(select(Item.job_id).where(Item.id.in_(item_ids))))
    try:
        finished = _in_transaction(
            session_factory,
            settings,
            "finding the ended jobs",
            lambda session: [job_id for job_id, status in session.execute(query) if JobStatus(status).is_terminal()],
        )
    except Exception:  # noqa: BLE001 - the items are recorded; their jobs' ends are swept up later
        logger.exception("finding the ended jobs of items %s failed", [str(item_id) for item_id in item_ids])
        return []
    for job_id in finished:
        try:
            _in_transaction(
                session_factory,
                settings,
                f"writing the results manifest of job {job_id}",
                lambda session, job_id=job_id: write_results_manifest(session, storage, job_id),
            )
        except Exception:  # noqa: BLE001 - the items are recorded; a later call or a reader can rewrite it
            logger.exception("writing the results manifest of job %s failed", job_id)
    try:
        runs.publish_runs_of_jobs(session_factory=session_factory, storage=storage, job_ids=finished)
    except Exception:  # noqa: BLE001 - the schedule dispatcher's sweep publishes what is left
        logger.exception("publishing the augmentation runs of jobs %s failed", finished)
    return finished
