"""Uploaded input images: checked before they are stored, and resolved when a job refers to them.

A *reference* is a storage key in the tenant's own space: ``uploads/<tenant>/<upload id><suffix>`` for an
upload (see :func:`xmgie.jobs.storage.upload_key`), or ``data/<tenant>/<path>`` for an image in the tenant's data
space (uploaded with a ``path``, or written there directly with the operator's S3 tools — such images are only
checked when a worker reads them). A job stores the reference as the item's input key, so workers read the bytes
without any lookup. The tenant in the key is what makes it usable by its owner only. The original bytes are kept
as sent (no re-encoding); an upload without a path gets the suffix of the format Pillow recognised.

Rejections are :class:`~xmgie.editing.errors.EditInputError` with a stable code: ``upload_too_large`` (more bytes
than allowed), ``image_too_large`` (more pixels than allowed), the codes of
:func:`~xmgie.editing.images.load_image` (``empty_image``, ``not_an_image``, ``truncated_image``), and
``unknown_upload`` for a reference that is not an existing upload of the tenant.
"""

from __future__ import annotations

import hashlib
import io
import re
import uuid
import warnings
from dataclasses import dataclass

from PIL import Image

from xmgie.editing.errors import EditInputError
from xmgie.editing.images import load_image
from xmgie.jobs.storage import InvalidKeyError, Storage, data_key, data_prefix, upload_key, validate_key

_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tiff", "BMP": ".bmp", "GIF": ".gif"}
_REFERENCE = re.compile(r"uploads/(?P<tenant>[0-9a-f-]{36})/(?P<upload>[0-9a-f-]{36})\.[a-z0-9]{1,8}")


class UploadTooLargeError(EditInputError):
    """The upload has more bytes than ``Settings.max_upload_bytes`` allows."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__("upload_too_large", f"upload has {size} bytes or more; at most {limit} are allowed")


class UnknownUploadError(EditInputError):
    """A job refers to something that is not an existing upload or data-space image of its tenant."""

    def __init__(self, reference: str) -> None:
        super().__init__("unknown_upload", f"{reference!r} is not an upload or data-space image of this tenant")


@dataclass(frozen=True)
class StoredUpload:
    """What was stored: the reference to use in jobs, and what the image turned out to be."""

    reference: str
    upload_id: uuid.UUID
    width: int
    height: int
    format: str
    content_type: str
    size_bytes: int
    sha256: str


def check_upload_size(size: int, *, max_bytes: int) -> None:
    """Raise :class:`UploadTooLargeError` when ``size`` exceeds ``max_bytes``."""
    if size > max_bytes:
        raise UploadTooLargeError(size, max_bytes)


def inspect_image(data: bytes, *, max_pixels: int) -> tuple[str, int, int]:
    """``(format, width, height)`` of an image file's bytes, fully decoded to make sure it can be edited.

    The pixel count is checked from the header before any decoding, so an oversized image costs no memory.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                image_format, (width, height) = probe.format or "", probe.size
    except Exception:
        # Unreadable headers get their precise code from load_image below.
        image_format, width, height = "", 0, 0
    if width * height > max_pixels:
        raise EditInputError(
            "image_too_large", f"image is {width}x{height} ({width * height} pixels); at most {max_pixels} are allowed"
        )
    image = load_image(data)
    return image_format or "PNG", image.width, image.height


MAX_KEY_BYTES = 1024
"""Longest object key in UTF-8 bytes: S3's limit, and the length of the reference columns."""

MAX_NAME_BYTES = 200
"""Longest segment of a key in UTF-8 bytes: file systems hold 255, less the local backend's partial-write suffix."""


def _check_key_length(key: str) -> None:
    """``invalid_path`` for a key that S3, the reference columns or a file system could not hold."""
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise EditInputError("invalid_path", f"the key of this path would be longer than {MAX_KEY_BYTES} bytes")
    if any(len(name.encode("utf-8")) > MAX_NAME_BYTES for name in key.split("/")):
        raise EditInputError("invalid_path", f"a name in this path is longer than {MAX_NAME_BYTES} bytes")


def store_upload(
    *,
    storage: Storage,
    tenant_id: uuid.UUID,
    data: bytes,
    max_bytes: int,
    max_pixels: int,
    path: str | None = None,
) -> StoredUpload:
    """Check ``data`` (size, format, pixel count) and store it as an upload of the tenant, or at ``path`` in the
    tenant's data space (replacing what was there) when a path is given.

    An upload's id derives from the tenant and the bytes, so the same file uploaded again gets the same reference:
    a client that uploads its inputs again and resubmits with the same idempotency key sends the same body.
    """
    check_upload_size(len(data), max_bytes=max_bytes)
    if path is not None:
        try:
            key = data_key(tenant_id, path)
        except InvalidKeyError as error:
            raise EditInputError("invalid_path", f"path {path!r} is not a safe relative path: {error}") from None
        _check_key_length(key)
    image_format, width, height = inspect_image(data, max_pixels=max_pixels)
    upload_id = uuid.uuid5(tenant_id, hashlib.sha256(data).hexdigest())
    if path is None:
        suffix = _SUFFIXES.get(image_format, f".{image_format.lower()}")
        key = upload_key(tenant_id, upload_id, suffix)
    content_type = Image.MIME.get(image_format, "application/octet-stream")
    sha256 = storage.put_bytes(key, data, content_type=content_type)
    return StoredUpload(
        reference=key,
        upload_id=upload_id,
        width=width,
        height=height,
        format=image_format,
        content_type=content_type,
        size_bytes=len(data),
        sha256=sha256,
    )


def in_tenant_space(reference: str, tenant_id: uuid.UUID) -> bool:
    """Whether ``reference`` is a well-formed upload key or data-space key of the tenant (existing or not)."""
    match = _REFERENCE.fullmatch(reference or "")
    if match is not None:
        return match["tenant"] == str(tenant_id)
    prefix = data_prefix(tenant_id)
    if not (reference or "").startswith(prefix):
        return False
    try:
        validate_key(reference)
    except InvalidKeyError:
        return False
    return True


def resolve_upload(*, storage: Storage, tenant_id: uuid.UUID, reference: str) -> str:
    """The storage key of the tenant's upload or data-space image ``reference``; :class:`UnknownUploadError` if it
    is not in the tenant's space or does not exist."""
    if not in_tenant_space(reference, tenant_id) or not storage.exists(reference):
        raise UnknownUploadError(reference)
    return reference
