"""Processing of items: claims, input checks, micro-batches, retries, cancellation and the results manifest."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from sqlalchemy import Engine, select

from tests.conftest import gradient_image
from xmgie.editing.options import EditOptions
from xmgie.editing.pipeline import XMGIEPipeline
from xmgie.jobs import transitions
from xmgie.jobs.editor import EditRequest, EditResult, PipelineEditor
from xmgie.jobs.manifests import results_manifest_lines
from xmgie.jobs.models import Item, Job, Tenant
from xmgie.jobs.processing import process_items
from xmgie.jobs.settings import Settings
from xmgie.jobs.storage import LocalStorage, manifest_key

WORKER = "test-worker"


class PaintingEditor:
    """Paints the left half of each image red; records every call; can fail its first ``failures`` calls."""

    def __init__(self, failures: int = 0) -> None:
        self.calls: list[list[EditRequest]] = []
        self.failures = failures

    def edit(self, requests: list[EditRequest]) -> list[EditResult]:
        self.calls.append(list(requests))
        if len(self.calls) <= self.failures:
            raise RuntimeError("simulated device failure")
        results = []
        for request in requests:
            image = request.image.copy()
            image.paste((255, 0, 0), (0, 0, image.width // 2, image.height))
            results.append(
                EditResult(
                    image=image,
                    mask=request.mask,
                    expressive_instruction=f"expressive: {request.instruction}",
                    identity_score=0.5,
                    edit_scope="global" if request.mask is None else "local",
                    mask_fraction=1.0 if request.mask is None else 0.25,
                    timings={"total": 0.01, "batch_size": float(len(requests))},
                )
            )
        return results


@pytest.fixture
def settings(engine: Engine) -> Settings:
    return Settings(database_url=str(engine.url), max_attempts=2, max_image_pixels=100 * 100, lease_seconds=60)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_job(session_factory, storage: LocalStorage, inputs: list[bytes]) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A job with one item per input (stored under uploads/), fast options; its id and item ids by index."""
    with session_factory() as session, session.begin():
        tenant = Tenant(name=f"tenant-{uuid.uuid4().hex}")
        session.add(tenant)
        session.flush()
        items = []
        for index, data in enumerate(inputs):
            key = f"uploads/{tenant.id}/{index}.png"
            storage.put_bytes(key, data)
            items.append(
                {"input_key": key, "instruction": f"edit {index}", "seed": index, "options": {"max_side": 64}}
            )
        job, _ = transitions.create_job(session=session, tenant_id=tenant.id, items=items)
        job_id = job.id
        item_ids = list(session.execute(select(Item.id).where(Item.job_id == job_id).order_by(Item.index)).scalars())
    return job_id, item_ids


def items_of(session_factory, job_id: uuid.UUID) -> list[Item]:
    with session_factory() as session:
        return list(session.execute(select(Item).where(Item.job_id == job_id).order_by(Item.index)).scalars())


def job_of(session_factory, job_id: uuid.UUID) -> Job:
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def run(session_factory, storage, editor, item_ids, settings):
    return process_items(
        session_factory=session_factory,
        storage=storage,
        editor=editor,
        item_ids=item_ids,
        worker=WORKER,
        settings=settings,
    )


def test_items_succeed_as_one_micro_batch_with_outputs_matching_the_database(session_factory, storage, settings):
    sources = [gradient_image(64, 48, phase) for phase in (0.0, 1.0, 2.0)]
    job_id, item_ids = make_job(session_factory, storage, [png(image) for image in sources])
    editor = PaintingEditor()

    outcomes = run(session_factory, storage, editor, item_ids, settings)

    assert [outcome.status for outcome in outcomes] == ["succeeded"] * 3
    assert len(editor.calls) == 1 and len(editor.calls[0]) == 3
    assert [request.seed for request in editor.calls[0]] == [0, 1, 2]
    for item, source in zip(items_of(session_factory, job_id), sources, strict=True):
        assert item.status == "succeeded" and item.attempts == 1
        assert item.output_key == f"jobs/{job_id}/{item.index}.png"
        data = storage.get_bytes(item.output_key)
        assert hashlib.sha256(data).hexdigest() == item.output_sha256
        output = Image.open(io.BytesIO(data))
        assert output.size == source.size
        assert output.getpixel((0, 0)) == (255, 0, 0)
        assert output.getpixel((63, 47)) == source.getpixel((63, 47))
        assert item.expressive_instruction == f"expressive: edit {item.index}"
        assert item.metrics["identity_score"] == 0.5
        assert item.metrics["edit_scope"] == "global" and item.metrics["mask_fraction"] == 1.0
    job = job_of(session_factory, job_id)
    assert job.status == "succeeded" and job.succeeded_count == 3


def test_bad_inputs_fail_alone_with_their_codes(session_factory, storage, settings):
    good = png(gradient_image(32, 32))
    truncated = good[: len(good) // 2]
    oversized = png(Image.new("RGB", (120, 120), "blue"))
    job_id, item_ids = make_job(session_factory, storage, [good, b"not an image at all", truncated, oversized, good])
    editor = PaintingEditor()

    outcomes = run(session_factory, storage, editor, item_ids, settings)

    assert [outcome.status for outcome in outcomes] == ["succeeded", "failed", "failed", "failed", "succeeded"]
    items = items_of(session_factory, job_id)
    assert [item.error_code for item in items] == [None, "not_an_image", "truncated_image", "image_too_large", None]
    assert "120x120" in items[3].error_message
    assert len(editor.calls) == 1 and len(editor.calls[0]) == 2
    assert job_of(session_factory, job_id).status == "partial"


def test_missing_input_object_fails_with_image_not_found(session_factory, storage, settings):
    job_id, item_ids = make_job(session_factory, storage, [png(gradient_image(32, 32))])
    storage.delete(items_of(session_factory, job_id)[0].input_key)

    outcomes = run(session_factory, storage, PaintingEditor(), item_ids, settings)

    assert outcomes[0].status == "failed" and outcomes[0].error_code == "image_not_found"


def test_editor_failure_requeues_then_fails_with_internal_error(session_factory, storage, settings):
    job_id, item_ids = make_job(session_factory, storage, [png(gradient_image(32, 32))] * 2)
    editor = PaintingEditor(failures=10)

    first = run(session_factory, storage, editor, item_ids, settings)
    assert [outcome.status for outcome in first] == ["queued", "queued"]
    items = items_of(session_factory, job_id)
    assert [(item.status, item.attempts, item.error_code) for item in items] == [("queued", 1, "internal_error")] * 2
    assert "simulated device failure" in items[0].error_message

    second = run(session_factory, storage, editor, item_ids, settings)
    assert [outcome.status for outcome in second] == ["failed", "failed"]
    items = items_of(session_factory, job_id)
    assert [(item.status, item.attempts, item.error_code) for item in items] == [("failed", 2, "internal_error")] * 2
    # Attempts are used up: a third message changes nothing and runs nothing.
    third = run(session_factory, storage, editor, item_ids, settings)
    assert [outcome.status for outcome in third] == ["skipped", "skipped"]
    assert len(editor.calls) == 2
    assert job_of(session_factory, job_id).status == "failed"


def test_a_succeeded_item_is_not_redone(session_factory, storage, settings):
    job_id, item_ids = make_job(session_factory, storage, [png(gradient_image(32, 32))])
    editor = PaintingEditor()
    run(session_factory, storage, editor, item_ids, settings)
    before = items_of(session_factory, job_id)[0]

    again = run(session_factory, storage, editor, item_ids, settings)

    assert again[0].status == "skipped"
    assert len(editor.calls) == 1
    after = items_of(session_factory, job_id)[0]
    assert (after.attempts, after.output_sha256, after.finished_at) == (1, before.output_sha256, before.finished_at)


def test_a_canceled_jobs_items_are_not_edited(session_factory, storage, settings):
    job_id, item_ids = make_job(session_factory, storage, [png(gradient_image(32, 32))] * 2)
    with session_factory() as session, session.begin():
        transitions.cancel_job(session=session, job_id=job_id)
    editor = PaintingEditor()

    outcomes = run(session_factory, storage, editor, item_ids, settings)

    assert [outcome.status for outcome in outcomes] == ["skipped", "skipped"]
    assert editor.calls == []
    assert [item.status for item in items_of(session_factory, job_id)] == ["canceled", "canceled"]
    assert storage.exists(manifest_key(job_id))


def test_a_cancel_arriving_while_inputs_load_cancels_the_claimed_items(session_factory, storage, settings):
    job_id, item_ids = make_job(session_factory, storage, [png(gradient_image(32, 32))] * 2)

    class CancelingStorage(LocalStorage):
        def get_bytes(self, key: str) -> bytes:
            with session_factory() as session, session.begin():
                if not transitions.is_cancel_requested(session=session, job_id=job_id):
                    transitions.cancel_job(session=session, job_id=job_id)
            return super().get_bytes(key)

    editor = PaintingEditor()
    outcomes = run(session_factory, CancelingStorage(storage.root), editor, item_ids, settings)

    assert [outcome.status for outcome in outcomes] == ["canceled", "canceled"]
    assert editor.calls == []
    assert job_of(session_factory, job_id).status == "canceled"


def test_the_results_manifest_is_written_when_the_job_ends(session_factory, storage, settings):
    job_id, item_ids = make_job(session_factory, storage, [png(gradient_image(32, 32)), b"broken", b""])
    editor = PaintingEditor()

    run(session_factory, storage, editor, item_ids[:1], settings)
    assert not storage.exists(manifest_key(job_id))

    run(session_factory, storage, editor, item_ids[1:], settings)
    lines = [json.loads(line) for line in storage.get_bytes(manifest_key(job_id)).decode().splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert [line["status"] for line in lines] == ["succeeded", "failed", "failed"]
    assert [line["error_code"] for line in lines] == [None, "not_an_image", "empty_image"]
    assert lines[0]["output"] == f"jobs/{job_id}/0.png"
    assert lines[0]["sha256"] == hashlib.sha256(storage.get_bytes(lines[0]["output"])).hexdigest()
    assert lines[0]["expressive_instruction"] == "expressive: edit 0"
    assert lines[0]["edit_scope"] == "global" and lines[0]["mask_fraction"] == 1.0
    assert lines[1]["edit_scope"] is None
    with session_factory() as session:
        assert results_manifest_lines(session, job_id) == lines


def test_pipeline_editor_groups_by_batch_key_with_one_seeded_generator_per_item():
    calls = []

    class Pipe:
        """Records each call; makes its generators as the pipeline does."""

        _execution_device = torch.device("cpu")
        seeded_generators = XMGIEPipeline.seeded_generators

        def __call__(self, images, instructions, **kwargs):
            calls.append((instructions, kwargs))
            return SimpleNamespace(
                images=[image.copy() for image in images],
                expressive_instructions=[f"x {text}" for text in instructions],
                masks=[None] * len(images),
                timings={"diffusion": 0.1},
                identity_scores=[0.9] * len(images),
                preservation=[None] * len(images),
                edit_scopes=["global"] * len(images),
                mask_fractions=[1.0] * len(images),
            )

    fast, slow = EditOptions(num_inference_steps=2), EditOptions(num_inference_steps=3, pfb=False, detail=False)
    requests = [
        EditRequest(image=gradient_image(16, 16), instruction=f"i{n}", options=options, seed=n)
        for n, options in enumerate([fast, slow, fast])
    ]

    results = PipelineEditor(Pipe()).edit(requests)

    assert [call[0] for call in calls] == [["i0", "i2"], ["i1"]]
    first, second = calls[0][1], calls[1][1]
    assert first["num_inference_steps"] == 2 and second["num_inference_steps"] == 3
    assert second["pfb"].enabled is False
    assert (first["detail"], second["detail"]) == (True, False)
    expected = torch.Generator().manual_seed(2).initial_seed()
    assert [generator.initial_seed() for generator in first["generator"]] == [0, expected]
    assert [result.expressive_instruction for result in results] == ["x i0", "x i1", "x i2"]
    assert [result.edit_scope for result in results] == ["global"] * 3
    assert [result.mask_fraction for result in results] == [1.0] * 3
    assert results[0].timings["batch_size"] == 2.0
