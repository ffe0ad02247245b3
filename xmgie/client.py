"""``xmgie submit`` and ``xmgie status``: the client side of the job service, on the standard library only.

:class:`ApiClient` speaks the ``/v1`` HTTP API with ``urllib.request`` (uploads as hand-written
``multipart/form-data``). ``xmgie submit`` reads a manifest with :func:`xmgie.jobs.batch.read_manifest` (the same
checks and messages as ``xmgie batch``), uploads each distinct input file once, submits the job and prints its id;
with ``--wait`` it polls the job until it finishes, and with ``--output-dir`` it downloads the succeeded items'
results under the names ``xmgie batch`` uses and writes ``results.jsonl`` from the job's results manifest.

The default idempotency key is :func:`xmgie.jobs.batch.idempotency_key` of the manifest's bytes, the
``--steps``/``--max-side`` overrides and the SHA-256 of every input file, so running the same command again returns
the same job instead of submitting it twice (the inputs are uploaded again; the job is not).

Result URLs are fetched as the API hands them out: presigned ``http(s)://`` URLs for S3 storage, ``file://`` URLs
for a local storage folder. The latter are readable only on the machine (or a machine sharing the folder) where the
API stores its files.

Exit codes: 0 done (or, with ``--wait``, every item succeeded), 1 for a failure of the service or the connection,
2 for a user error (an invalid manifest, a missing input file, an API answer with a 4xx status), 3 when the job
ended ``partial``, 4 when it ended ``failed`` or ``canceled``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mimetypes
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlencode, urlsplit
from urllib.request import Request, urlopen

if TYPE_CHECKING:
    from xmgie.jobs.batch import ManifestEntry

API_URL_ENV = "XMGIE_API_URL"
"""Environment variable naming the API's base URL when ``--api`` is not given."""

API_KEY_ENV = "XMGIE_API_KEY"
"""Environment variable holding the API key when ``--api-key`` is not given."""

DEFAULT_TIMEOUT = 120.0
"""Seconds one HTTP request may take."""

ITEMS_PAGE_SIZE = 1000
"""Items asked for per page when listing a job's items."""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_FAILED = 4

_EXIT_BY_STATUS = {"succeeded": EXIT_OK, "partial": EXIT_PARTIAL, "failed": EXIT_FAILED, "canceled": EXIT_FAILED}
_TERMINAL = frozenset(_EXIT_BY_STATUS)
_COUNT_NAMES = ("queued", "running", "succeeded", "failed", "canceled")


class ClientError(Exception):
    """A failure of a client command; ``code`` is machine-readable, ``exit_code`` what the command exits with."""

    def __init__(self, code: str, message: str, *, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.exit_code = exit_code


class ApiError(ClientError):
    """An error answer of the API: its HTTP ``status`` and the ``code`` and ``message`` of its error envelope.

    A 4xx answer is the caller's error (exit 2); anything else is the service's (exit 1).
    """

    def __init__(self, status: int, code: str, message: str, *, item: int | None = None) -> None:
        super().__init__(code, message, exit_code=EXIT_USAGE if 400 <= status < 500 else EXIT_ERROR)
        self.status = status
        self.item = item


class ApiUnreachableError(ClientError):
    """The API did not answer: connection refused, unknown host, time-out."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__("api_unreachable", f"cannot reach the API at {url}: {reason}")
        self.url = url


def _reason(error: BaseException) -> str:
    if isinstance(error, URLError) and not isinstance(error, HTTPError):
        error = error.reason if isinstance(error.reason, BaseException) else error
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (is `xmgie api` running there?)"
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, socket.gaierror):
        return f"unknown host ({error.strerror or error})"
    return str(getattr(error, "strerror", None) or getattr(error, "reason", None) or error)


def encode_multipart(field: str, filename: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body holding one file field; returns the body and its ``Content-Type`` header."""
    boundary = f"xmgie-{uuid.uuid4().hex}"
    safe_name = filename.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="{safe_name}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _error_from_response(error: HTTPError) -> ApiError:
    """The ``ApiError`` of an error answer, from its JSON envelope when it has one."""
    try:
        body = error.read()
    except OSError:
        body = b""
    try:
        detail = json.loads(body)["error"]
        return ApiError(error.code, str(detail["code"]), str(detail["message"]), item=detail.get("item"))
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip()[:200] or str(error.reason or "")
        return ApiError(error.code, f"http_{error.code}", text or f"HTTP {error.code}")


class ApiClient:
    """A client of the ``/v1`` API at ``base_url`` (``http://host:port``; a trailing ``/v1`` is accepted)."""

    def __init__(self, base_url: str, api_key: str | None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ClientError(
                "invalid_api_url", f"API URL must be http(s)://host[:port], got {base_url!r}", exit_code=2
            )
        base = base_url.rstrip("/")
        self.base_url = base.removesuffix("/v1")
        self.api_key = api_key
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        json_body: Any = None,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> tuple[int, Any]:
        """Send one request to ``path`` (such as ``/v1/jobs``); the status and the decoded JSON answer.

        Raises ``ApiError`` for an error answer and ``ApiUnreachableError`` when the API does not answer.
        """
        url = self.base_url + path
        given = {key: value for key, value in (query or {}).items() if value is not None}
        if given:
            url += "?" + urlencode(given)
        headers = {"Accept": "application/json", "User-Agent": "xmgie-client"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if json_body is not None:
            body = json.dumps(json_body).encode()
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        try:
            with urlopen(Request(url, data=body, headers=headers, method=method), timeout=self.timeout) as response:
                status, payload = response.status, response.read()
        except HTTPError as error:
            raise _error_from_response(error) from None
        except (URLError, OSError) as error:
            raise ApiUnreachableError(self.base_url, _reason(error)) from None
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            raise ApiError(
                status, "invalid_response", f"{method} {path} answered something that is not JSON"
            ) from None

    def upload(self, path: Path) -> dict[str, Any]:
        """``POST /v1/uploads`` of the file at ``path``; the stored upload (its ``reference`` goes into items)."""
        data = path.read_bytes()
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        body, header = encode_multipart("file", path.name, data, content_type)
        return self.request("POST", "/v1/uploads", body=body, content_type=header)[1]

    def submit_job(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """``POST /v1/jobs``; the job, and whether it was created now (False: the idempotency key's earlier job)."""
        status, job = self.request("POST", "/v1/jobs", json_body=body)
        return job, status == 202

    def job(self, job_id: str) -> dict[str, Any]:
        """``GET /v1/jobs/{id}``: status, counts and progress."""
        return self.request("GET", f"/v1/jobs/{quote(job_id, safe='')}")[1]

    def items(self, job_id: str, status: str | None = None) -> Iterator[dict[str, Any]]:
        """Every item of the job (only those in ``status`` when given), in index order, page after page."""
        cursor = None
        while True:
            page = self.request(
                "GET",
                f"/v1/jobs/{quote(job_id, safe='')}/items",
                query={"status": status, "cursor": cursor, "limit": ITEMS_PAGE_SIZE},
            )[1]
            yield from page["data"]
            cursor = page.get("next_cursor")
            if cursor is None:
                return

    def manifest(self, job_id: str) -> dict[str, Any]:
        """``GET /v1/jobs/{id}/manifest``: the job's results manifest."""
        return self.request("GET", f"/v1/jobs/{quote(job_id, safe='')}/manifest")[1]

    def cancel(self, job_id: str) -> dict[str, Any]:
        """``POST /v1/jobs/{id}/cancel``."""
        return self.request("POST", f"/v1/jobs/{quote(job_id, safe='')}/cancel")[1]

    def download(self, url: str) -> bytes:
        """The bytes at a result URL (presigned or ``file://``); sent without the API key, which it does not need."""
        try:
            with urlopen(Request(url, headers={"User-Agent": "xmgie-client"}), timeout=self.timeout) as response:
                return response.read()
        except HTTPError as error:
            raise ClientError("download_failed", f"{_short(url)} answered HTTP {error.code}") from None
        except (URLError, OSError) as error:
            hint = ""
            if url.startswith("file:"):
                hint = " (the API stores results in a local folder: run the client where that folder is readable)"
            raise ClientError("download_failed", f"cannot read {_short(url)}: {_reason(error)}{hint}") from None


def _short(url: str) -> str:
    """A URL without its query string (presigned URLs carry their signature there)."""
    return url.split("?", 1)[0]


# --- Submitting ---------------------------------------------------------------------------------------------------


@dataclass
class Submission:
    """What ``submit_manifest`` did: the job, whether it was created now, and the number of files uploaded."""

    job: dict[str, Any]
    created: bool
    uploads: int
    entries: list[ManifestEntry]


def _input_files(entries: list[ManifestEntry]) -> dict[Path, tuple[str, int]]:
    """Each distinct input file of the manifest (resolved path) with the first ``(what, line)`` that names it."""
    files: dict[Path, tuple[str, int]] = {}
    for entry in entries:
        for what, path in (
            ("image", entry.image_path),
            ("mask", entry.mask_path),
            ("identity image", entry.identity_path),
        ):
            if path is not None:
                files.setdefault(path.resolve(), (what, entry.line))
    return files


def _read_inputs(manifest: Path, entries: list[ManifestEntry]) -> dict[Path, bytes]:
    """The bytes of every input file; ``ClientError`` (exit 2) naming the line of the first one missing."""
    contents = {}
    for path, (what, line) in _input_files(entries).items():
        try:
            contents[path] = path.read_bytes()
        except OSError as error:
            reason = "not found" if isinstance(error, FileNotFoundError) else (error.strerror or str(error))
            raise ClientError("input_not_found", f"{manifest}:{line}: {what} {reason}: {path}", exit_code=2) from None
    return contents


def submit_manifest(
    client: ApiClient,
    manifest: Path,
    *,
    steps: int | None = None,
    max_side: int | None = None,
    key: str | None = None,
    webhook_url: str | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> Submission:
    """Upload the manifest's inputs (each distinct file once) and submit its job.

    Raises ``ManifestError`` for an invalid manifest and ``ClientError`` for a missing input file, both before
    anything is sent; ``ApiError`` for an upload or submission the API refuses.
    """
    from xmgie.jobs.batch import idempotency_key, read_manifest

    manifest_bytes = manifest.read_bytes()
    entries = read_manifest(manifest, steps=steps, max_side=max_side)
    contents = _read_inputs(manifest, entries)
    digests = {path: hashlib.sha256(data).hexdigest() for path, data in contents.items()}
    if key is None:
        inputs = sorted(set(digests.values()))
        key = idempotency_key(manifest_bytes, {"num_inference_steps": steps, "max_side": max_side, "inputs": inputs})

    references: dict[str, str] = {}
    uploaded = 0
    for path, (what, line) in _input_files(entries).items():
        digest = digests[path]
        if digest in references:
            continue
        try:
            references[digest] = client.upload(path)["reference"]
        except ApiError as error:
            if error.status in (413, 415, 422):  # the file itself was refused: name it
                error.message = f"{manifest}:{line}: {what} {path}: {error.message}"
            raise
        uploaded += 1
        log(f"uploaded {path.name} ({uploaded})")

    def reference(path: Path | None) -> str | None:
        return None if path is None else references[digests[path.resolve()]]

    items = []
    for entry in entries:
        item: dict[str, Any] = {"image": reference(entry.image_path), "instruction": entry.instruction}
        if entry.mask_path is not None:
            item["mask"] = reference(entry.mask_path)
        if entry.identity_path is not None:
            item["identity_image"] = reference(entry.identity_path)
        if entry.seed is not None:
            item["seed"] = entry.seed
        if entry.options:
            item["options"] = entry.options
        items.append(item)
    body: dict[str, Any] = {"items": items, "idempotency_key": key}
    if webhook_url:
        body["webhook_url"] = webhook_url
    job, created = client.submit_job(body)
    return Submission(job=job, created=created, uploads=uploaded, entries=entries)


# --- Waiting and downloading --------------------------------------------------------------------------------------


def describe_counts(job: dict[str, Any]) -> str:
    """``3/10 finished (2 succeeded, 1 failed, 0 canceled; 6 queued, 1 running)``."""
    counts = job["counts"]
    finished = counts["succeeded"] + counts["failed"] + counts["canceled"]
    text = (
        f"{finished}/{job['item_count']} finished ({counts['succeeded']} succeeded, {counts['failed']} failed, "
        f"{counts['canceled']} canceled"
    )
    if counts["queued"] or counts["running"]:
        text += f"; {counts['queued']} queued, {counts['running']} running"
    return text + ")"


def wait_for_job(
    client: ApiClient,
    job_id: str,
    *,
    poll_interval: float = 2.0,
    timeout: float | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Poll the job until it is finished (``succeeded``, ``partial``, ``failed`` or ``canceled``); the final job.

    ``log`` gets a line whenever the status or counts change. Raises ``ClientError`` (``wait_timeout``) after
    ``timeout`` seconds.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    while True:
        job = client.job(job_id)
        line = f"job {job_id}: {job['status']}, {describe_counts(job)}"
        if line != last:
            log(line)
            last = line
        if job["status"] in _TERMINAL:
            return job
        if deadline is not None and time.monotonic() >= deadline:
            raise ClientError(
                "wait_timeout", f"job {job_id} is still {job['status']} after {timeout:g} s ({describe_counts(job)})"
            )
        pause = poll_interval if deadline is None else min(poll_interval, max(deadline - time.monotonic(), 0.0))
        time.sleep(pause)


def _write_file(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a hidden partial file, unless it already holds exactly those bytes."""
    if target.is_file() and target.read_bytes() == data:
        return
    partial = target.with_name(f".{target.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, target)


def download_results(
    client: ApiClient, job_id: str, entries: list[ManifestEntry], output_dir: Path
) -> tuple[int, Path]:
    """Download every succeeded item's result (and the mask it used) to ``output_dir`` as ``xmgie batch`` names
    them, and write ``results.jsonl`` (the job's results manifest, one line per item, with the local file names);
    the number of results downloaded and the path of ``results.jsonl``.
    """
    from xmgie.jobs.batch import output_name

    output_dir.mkdir(parents=True, exist_ok=True)
    files: dict[int, dict[str, str | None]] = {}
    downloaded = 0
    for item in client.items(job_id, status="succeeded"):
        index = item["index"]
        entry = entries[index]
        output_path = mask_path = None
        if item.get("result_url"):
            data = client.download(item["result_url"])
            expected = item.get("output_sha256")
            if expected and hashlib.sha256(data).hexdigest() != expected:
                raise ClientError("download_corrupt", f"the result of item {index} does not match its SHA-256")
            output_path = output_dir / output_name(index, entry)
            _write_file(output_path, data)
            downloaded += 1
        if item.get("mask_url"):
            mask_path = output_dir / output_name(index, entry, "_mask")
            _write_file(mask_path, client.download(item["mask_url"]))
        files[index] = {
            "output_file": str(output_path) if output_path else None,
            "mask_file": str(mask_path) if mask_path else None,
        }
    records = client.manifest(job_id)["records"]
    lines = []
    for record in records:
        index = record.get("index")
        local = files.get(index, {"output_file": None, "mask_file": None})
        manifest_image = entries[index].image if isinstance(index, int) and 0 <= index < len(entries) else None
        lines.append({**record, "manifest_image": manifest_image, **local})
    results_path = output_dir / "results.jsonl"
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    _write_file(results_path, text.encode("utf-8"))
    return downloaded, results_path


# --- Commands -----------------------------------------------------------------------------------------------------


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """``--api``, ``--api-key``, ``--json`` and the waiting options shared by ``submit`` and ``status``."""
    parser.add_argument("--api", help=f"base URL of the API, e.g. http://127.0.0.1:8000 (env {API_URL_ENV})")
    parser.add_argument("--api-key", help=f"API key from `xmgie admin create-key` (env {API_KEY_ENV})")
    parser.add_argument("--json", action="store_true", help="print the job as JSON")
    parser.add_argument(
        "--wait", action="store_true", help="wait until the job finishes; exit 0 succeeded, 3 partial, 4 failed"
    )
    parser.add_argument("--poll-interval", type=float, default=2.0, help="seconds between polls with --wait")
    parser.add_argument("--timeout", type=float, help="give up waiting after this many seconds (exit 1)")


def _client(args: argparse.Namespace) -> ApiClient:
    url = args.api or os.environ.get(API_URL_ENV)
    if not url:
        raise ClientError("no_api_url", f"name the API with --api URL or {API_URL_ENV}", exit_code=EXIT_USAGE)
    return ApiClient(url, args.api_key or os.environ.get(API_KEY_ENV))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _report(error: ClientError, args: argparse.Namespace) -> int:
    message = error.message
    if isinstance(error, ApiError) and error.status == 401 and not (args.api_key or os.environ.get(API_KEY_ENV)):
        message += f" (pass --api-key or set {API_KEY_ENV})"
    _stderr(f"error: {error.code}: {message}")
    return error.exit_code


def _print_job(job: dict[str, Any]) -> None:
    print(f"job {job['id']}: {job['status']}")
    counts = job["counts"]
    print(f"items: {job['item_count']} (" + ", ".join(f"{name} {counts[name]}" for name in _COUNT_NAMES) + ")")
    print(f"progress: {job['progress']:.0%}")
    times = [f"{name} {job[f'{name}_at']}" for name in ("created", "started", "finished") if job.get(f"{name}_at")]
    print("times: " + ", ".join(times))
    if job.get("cancel_requested_at"):
        print(f"cancel requested: {job['cancel_requested_at']}")


def _print_failures(client: ApiClient, job: dict[str, Any], limit: int = 20) -> None:
    if not job["counts"]["failed"]:
        return
    for shown, item in enumerate(client.items(str(job["id"]), status="failed")):
        if shown == limit:
            print(f"  ... and {job['counts']['failed'] - limit} more failed item(s)")
            break
        error = item.get("error") or {}
        print(f"  item {item['index']}: {error.get('code')}: {error.get('message')}")


def run_submit_command(args: argparse.Namespace) -> int:
    """``xmgie submit``: submit a manifest's job, print its id, and optionally wait for it and fetch the results."""
    from xmgie.jobs.batch import ManifestError

    if args.output_dir is not None and not args.wait:
        _stderr("error: --output-dir needs --wait (results exist once the job has finished)")
        return EXIT_USAGE
    if not args.manifest.is_file():
        _stderr(f"error: manifest not found: {args.manifest}")
        return EXIT_USAGE
    try:
        client = _client(args)
        submission = submit_manifest(
            client,
            args.manifest,
            steps=args.steps,
            max_side=args.max_side,
            key=args.idempotency_key,
            webhook_url=args.webhook_url,
            log=_stderr,
        )
        job = submission.job
        job_id = str(job["id"])
        if job["item_count"] != len(submission.entries):
            raise ClientError(
                "idempotency_conflict",
                f"job {job_id}, submitted earlier with this idempotency key, has {job['item_count']} items but the "
                f"manifest has {len(submission.entries)}; pass another --idempotency-key",
                exit_code=EXIT_USAGE,
            )
        state = "submitted" if submission.created else "already submitted (same idempotency key)"
        _stderr(f"job {job_id} {state}: {job['item_count']} item(s), {submission.uploads} file(s) uploaded")
        if not args.json:
            print(job_id, flush=True)
        if not args.wait:
            if args.json:
                print(json.dumps(job, indent=2))
            return EXIT_OK
        job = wait_for_job(client, job_id, poll_interval=args.poll_interval, timeout=args.timeout, log=_stderr)
        if args.output_dir is not None:
            count, results_path = download_results(client, job_id, submission.entries, args.output_dir)
            _stderr(f"downloaded {count} result(s) to {args.output_dir}; results: {results_path}")
        if args.json:
            print(json.dumps(job, indent=2))
        else:
            print(f"{job['status']}: {describe_counts(job)}")
            _print_failures(client, job)
        return _EXIT_BY_STATUS[job["status"]]
    except ManifestError as error:
        _stderr(f"error: {error}")
        return EXIT_USAGE
    except ClientError as error:
        return _report(error, args)
    except KeyboardInterrupt:
        _stderr("interrupted; the job goes on: see `xmgie status JOB_ID`")
        return 130


def run_status_command(args: argparse.Namespace) -> int:
    """``xmgie status``: print a job's status, counts and progress; with ``--wait``, once it has finished."""
    try:
        client = _client(args)
        if args.wait:
            job = wait_for_job(
                client, args.job_id, poll_interval=args.poll_interval, timeout=args.timeout, log=_stderr
            )
        else:
            job = client.job(args.job_id)
        if args.json:
            print(json.dumps(job, indent=2))
        else:
            _print_job(job)
            _print_failures(client, job)
        return _EXIT_BY_STATUS[job["status"]] if args.wait else EXIT_OK
    except ClientError as error:
        return _report(error, args)
    except KeyboardInterrupt:
        return 130
