"""Dependencies: settings, database sessions, the caller's identity, the task dispatcher."""
from __future__ import annotations

from typing import Annotated, Iterator

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from ..db.session import session_scope
from ..repository import owner_of_key
from ..settings import Settings

_bearer = HTTPBearer(auto_error=False)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(settings: Annotated[Settings, Depends(get_settings)]) -> Iterator[Session]:
    with session_scope(settings.database_url) as session:
        yield session


# Closed (committed) when the route returns, before the response is sent: a commit that fails (the
# database went away) is then a 503, not an error after a 200 is on the wire. Streamed bodies read
# the database through sessions of their own.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def current_owner(session: SessionDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The owner of a valid `Authorization: Bearer <key>`; 401 otherwise."""
    owner = owner_of_key(session, credentials.credentials) if credentials else None
    if owner is None:
        raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return owner


SettingsDep = Annotated[Settings, Depends(get_settings)]
OwnerDep = Annotated[str, Depends(current_owner)]
