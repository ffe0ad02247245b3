"""Dependencies of the routes as ``Annotated`` aliases: ``SessionDep``, ``StorageDep``, ``SettingsDep``,
``DispatchDep`` and ``CurrentTenant`` (the tenant of the ``Authorization: Bearer`` key).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated
from uuid import UUID

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import ApiError
from xmgie.jobs.auth import tenant_for_key
from xmgie.jobs.dispatch import Publisher
from xmgie.jobs.models import Tenant
from xmgie.jobs.settings import Settings
from xmgie.jobs.storage import Storage

Dispatch = Callable[[list[UUID]], None]
"""Publishes work for the given item ids; called only after their rows are committed."""

_CHALLENGE = {"WWW-Authenticate": "Bearer"}
_bearer = HTTPBearer(auto_error=False, description="an API key issued by `xmgie admin create-key`")


def get_session(request: Request) -> Iterator[Session]:
    """A database session for one request; routes commit what they change."""
    with request.app.state.session_factory() as session:
        yield session


def get_storage(request: Request) -> Storage:
    """The application's object storage."""
    return request.app.state.storage


def get_app_settings(request: Request) -> Settings:
    """The application's settings."""
    return request.app.state.settings


def get_dispatch(request: Request) -> Dispatch:
    """The application's work publisher."""
    return request.app.state.dispatch


def get_publisher(request: Request) -> Publisher:
    """The application's publisher of worker tasks (webhooks, schedule runs)."""
    return request.app.state.publisher


def get_current_tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Tenant:
    """The tenant owning the bearer key; 401 ``unauthorized`` without a valid key.

    The lookup runs in a session of its own, so the request's session starts its transaction with the route's
    first statement (a SQLite transaction that has read may fail to become a writer).
    """
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(401, "unauthorized", "an API key is required", headers=_CHALLENGE)
    with request.app.state.session_factory() as session:
        tenant = tenant_for_key(session=session, key=credentials.credentials)
    if tenant is None:
        raise ApiError(401, "unauthorized", "the API key is unknown or revoked", headers=_CHALLENGE)
    return tenant


SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
DispatchDep = Annotated[Dispatch, Depends(get_dispatch)]
PublisherDep = Annotated[Publisher, Depends(get_publisher)]
CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]
