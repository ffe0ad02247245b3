"""Presigned result URLs checked the way an S3 server checks them: the SigV4 query signature recomputed from the
canonical request with the known secret.

No server here verifies SigV4 signatures of presigned URLs: moto's server accepts any signature, MinIO's server is
neither packaged for Debian nor on PyPI (the ``minio`` package there is the client SDK only) and nothing else can be
downloaded here, and s3rver (npm) checks only SigV2 signatures (its SigV4 branch accepts any signature). So the
verification is written out here from the AWS specification (canonical request, string to sign, HMAC key chain),
independently of botocore, which makes the URLs; against a real MinIO or AWS the same URLs are fetched by
``docker compose`` users.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import pytest

from xmgie.jobs.storage import S3Storage

ACCESS_KEY = "AKIDEXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
INTERNAL = "http://minio:9000"
PUBLIC = "https://files.example.org"


class SignatureRefused(AssertionError):
    """The URL would be refused by the server (403)."""


def _sign(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def verify_presigned_get(url: str, *, secrets: dict[str, str], now: datetime) -> tuple[str, str]:
    """What an S3 server does with a presigned GET: ``(bucket, key)`` when the signature holds and has not expired,
    else ``SignatureRefused``. Path-style addressing; the Host header is the URL's host as a client sends it."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    params = dict(query)
    if params.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256":
        raise SignatureRefused(f"algorithm {params.get('X-Amz-Algorithm')!r}")
    access_key, date, region, service, terminator = params["X-Amz-Credential"].split("/")
    if service != "s3" or terminator != "aws4_request" or access_key not in secrets:
        raise SignatureRefused(f"credential {params['X-Amz-Credential']!r}")
    signed_at = datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    if signed_at.strftime("%Y%m%d") != date or now > signed_at + timedelta(seconds=int(params["X-Amz-Expires"])):
        raise SignatureRefused("expired")
    if params["X-Amz-SignedHeaders"] != "host":
        raise SignatureRefused(f"signed headers {params['X-Amz-SignedHeaders']!r}")

    default_port = {"http": 80, "https": 443}[parts.scheme]
    host = parts.hostname if parts.port in (None, default_port) else f"{parts.hostname}:{parts.port}"
    # S3 encodes each path segment once (RFC 3986 unreserved characters kept), the query's names and values too.
    path = "/".join(quote(unquote(segment), safe="-_.~") for segment in parts.path.split("/"))
    canonical_query = "&".join(
        f"{quote(name, safe='-_.~')}={quote(value, safe='-_.~')}"
        for name, value in sorted(query)
        if name != "X-Amz-Signature"
    )
    canonical_request = "\n".join(["GET", path, canonical_query, f"host:{host}", "", "host", "UNSIGNED-PAYLOAD"])
    scope = f"{date}/{region}/s3/aws4_request"
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", params["X-Amz-Date"], scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = _sign(f"AWS4{secrets[access_key]}".encode(), date)
    for part in (region, "s3", "aws4_request"):
        key = _sign(key, part)
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, params.get("X-Amz-Signature", "")):
        raise SignatureRefused("SignatureDoesNotMatch")
    bucket, _, object_key = unquote(parts.path).lstrip("/").partition("/")
    return bucket, object_key


def _storage(**overrides: object) -> S3Storage:
    # Presigning is computed locally: nothing here connects to the endpoints.
    options: dict[str, object] = {
        "endpoint_url": INTERNAL,
        "public_endpoint_url": PUBLIC,
        "region": "eu-west-3",
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET,
    }
    options.update(overrides)
    return S3Storage("results", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "key",
    ["jobs/0b5e/0.png", "data/t/my photos/été 2026 (1).png", "data/t/a+b=c&d~e;f.png", "data/t/100%.png"],
)
def test_result_urls_verify_for_the_public_endpoint(key: str) -> None:
    url = _storage().url(key, expires_in=600)
    assert url.startswith(f"{PUBLIC}/results/")
    now = datetime.now(UTC)
    assert verify_presigned_get(url, secrets={ACCESS_KEY: SECRET}, now=now) == ("results", key)
    # Valid for the time asked for, not more.
    verify_presigned_get(url, secrets={ACCESS_KEY: SECRET}, now=now + timedelta(seconds=590))
    with pytest.raises(SignatureRefused, match="expired"):
        verify_presigned_get(url, secrets={ACCESS_KEY: SECRET}, now=now + timedelta(seconds=620))


def test_the_verification_refuses_what_a_server_refuses() -> None:
    url = _storage().url("jobs/0b5e/0.png")
    now = datetime.now(UTC)
    secrets = {ACCESS_KEY: SECRET}
    refused = {
        "another object": url.replace("/0.png", "/1.png"),
        "another host (the internal endpoint)": url.replace(PUBLIC, INTERNAL),
        "another region": url.replace("eu-west-3", "us-east-1"),
        "a longer expiry": url.replace("X-Amz-Expires=", "X-Amz-Expires=9"),
    }
    for what, changed in refused.items():
        with pytest.raises(SignatureRefused):
            verify_presigned_get(changed, secrets=secrets, now=now)
            pytest.fail(f"{what} verified")
    with pytest.raises(SignatureRefused, match="SignatureDoesNotMatch"):
        verify_presigned_get(url, secrets={ACCESS_KEY: "another secret"}, now=now)


def test_without_a_public_endpoint_urls_are_signed_for_the_service_endpoint_and_prefix() -> None:
    storage = _storage(public_endpoint_url=None, prefix="tenant-a")
    url = storage.url("jobs/0b5e/0.png")
    assert url.startswith(f"{INTERNAL}/results/tenant-a/")
    bucket, key = verify_presigned_get(url, secrets={ACCESS_KEY: SECRET}, now=datetime.now(UTC))
    assert (bucket, key) == ("results", "tenant-a/jobs/0b5e/0.png")
