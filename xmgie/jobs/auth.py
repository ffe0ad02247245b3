"""API keys of tenants: issued once in clear text, stored only as a sha256 digest with a short display prefix."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from xmgie.jobs.models import ApiKey, Tenant

KEY_PREFIX = "xmgie_"
"""Every key starts with this marker, so leaked keys are easy to find in logs and repositories."""

DISPLAY_PREFIX_CHARS = 12
"""How many leading characters of a key are kept in clear, to tell keys apart in listings."""


def hash_api_key(key: str) -> str:
    """The hex sha256 of a key, as stored in ``api_keys.key_hash``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_api_key(*, session: Session, tenant_name: str) -> str:
    """Issue a new key for the tenant named ``tenant_name`` (created if needed); the clear key is returned once.

    The key is added to ``session``; the caller commits.
    """
    tenant_name = tenant_name.strip()
    if not tenant_name:
        raise ValueError("tenant name must not be empty")
    tenant = session.execute(select(Tenant).where(Tenant.name == tenant_name)).scalar_one_or_none()
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_api_key(key), prefix=key[:DISPLAY_PREFIX_CHARS]))
    session.flush()
    return key


def tenant_for_key(*, session: Session, key: str) -> Tenant | None:
    """The tenant owning ``key``, or None for an unknown or revoked key."""
    if not key or not key.startswith(KEY_PREFIX):
        return None
    query = (
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_api_key(key), ApiKey.revoked_at.is_(None))
    )
    return session.execute(query).scalar_one_or_none()
