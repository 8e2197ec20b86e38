"""The admin plane's bearer token: configured, or generated once and stored with mode 0600.

The admin plane is never open: with no ``CLASSMEANS_ADMIN_TOKEN``, the token stored in
``<store>/.admin_token`` is used, and if there is none a new one is generated, written there (mode 0600)
and printed once to the log. Tokens are compared in constant time (``hmac.compare_digest``).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.deps import StateDep
from service.api.errors import ApiError
from service.api.settings import MIN_TOKEN_CHARS, Settings
from service.store.atomic import write_bytes_atomic

log = logging.getLogger("classmeans.auth")

_bearer = HTTPBearer(auto_error=False, description="the admin token (CLASSMEANS_ADMIN_TOKEN or <store>/.admin_token)")


def resolve_admin_token(settings: Settings) -> str:
    """The configured token; else the stored one; else a new one, stored (0600) and logged once."""
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    path = settings.token_file
    if path.is_file():
        token = path.read_text().strip()
        if len(token) >= MIN_TOKEN_CHARS:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                log.warning("%s was readable by others (mode %o); setting mode 0600", path, mode)
                os.chmod(path, 0o600)
            log.info("admin token read from %s", path)
            return token
        log.warning("%s holds no usable token; generating a new one", path)
    token = secrets.token_urlsafe(32)
    try:
        write_bytes_atomic(path, (token + "\n").encode(), mode=0o600)
        where = f"stored in {path} (mode 0600)"
    except OSError as exc:
        where = f"NOT stored ({exc.strerror}); it lasts until this process stops"
    log.warning("generated admin token, %s: %s", where, token)
    return token


async def require_admin(state: StateDep,
                        creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """401 ``unauthorized`` unless ``Authorization: Bearer <token>`` carries the admin token."""
    expected = state.token
    given = creds.credentials if creds is not None else ""
    if not expected or creds is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "unauthorized", "a valid admin bearer token is required",
                       headers={"WWW-Authenticate": "Bearer"})
