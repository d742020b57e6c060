"""API keys: creation, lookup by hash, listing and revocation.

A key is `w2s_` followed by 43 URL-safe characters (32 random bytes). The database stores only
its SHA-256 and its first characters (for listings). A salted slow hash is unnecessary because
the key is random with 256 bits of entropy, not a password someone chose. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import uuid
from dataclasses import dataclass, field

from sqlalchemy import select

from workers.db import ApiKey, JobStore, utcnow

logger = logging.getLogger(__name__)

KEY_PREFIX = "w2s_"
# Characters of the key shown in listings: "w2s_" plus 6 random characters.
SHOWN_PREFIX_CHARS = 10

SCOPES = {
    "jobs": "Upload and read datasets; create, read and cancel own jobs; read and download models.",
    "models": "Register external models, set aliases and delete models.",
    "score": "Score pairs with a reward model (scoring service).",
    "admin": "Every scope, and the jobs and datasets of every key.",
}

# Owner recorded on jobs and datasets when W2S_AUTH_DISABLED is on.
DEVELOPMENT_OWNER = "development"


@dataclass(frozen=True)
class Principal:
    """The caller of a request: the API key's id, name and scopes."""

    key_id: str
    name: str
    scopes: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def has_scope(self, scope: str) -> bool:
        return self.is_admin or scope in self.scopes


DEVELOPMENT_PRINCIPAL = Principal(key_id=DEVELOPMENT_OWNER, name=DEVELOPMENT_OWNER, scopes=frozenset(SCOPES))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_scopes(text: str | list[str]) -> list[str]:
    """Split 'jobs,score' into a sorted scope list; raise ValueError naming an unknown scope."""
    items = text.split(",") if isinstance(text, str) else list(text)
    scopes = sorted({item.strip() for item in items if item.strip()})
    unknown = [scope for scope in scopes if scope not in SCOPES]
    if unknown or not scopes:
        raise ValueError(f"unknown or missing scopes {unknown or scopes!r}; choose from {sorted(SCOPES)}")
    return scopes


def create_api_key(store: JobStore, name: str, scopes: list[str]) -> tuple[ApiKey, str]:
    """Insert a new key and return its row and the key itself, which is not stored and cannot be shown again."""
    scopes = parse_scopes(scopes)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=str(uuid.uuid4()),
        name=name,
        prefix=key[:SHOWN_PREFIX_CHARS],
        key_hash=hash_key(key),
        scopes=scopes,
        created_at=utcnow(),
    )
    with store.session() as session:
        session.add(row)
    logger.info("API key %s (%s) created with scopes %s", row.id, name, scopes)
    return row, key


def list_api_keys(store: JobStore, *, include_revoked: bool = False) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    with store.session() as session:
        return list(session.scalars(query))


def revoke_api_key(store: JobStore, key_id_or_prefix: str) -> ApiKey:
    """Revoke the key with this id or shown prefix; raise LookupError when none or several match."""
    with store.session() as session:
        rows = list(
            session.scalars(select(ApiKey).where((ApiKey.id == key_id_or_prefix) | (ApiKey.prefix == key_id_or_prefix)))
        )
        if len(rows) != 1:
            raise LookupError(
                f"{len(rows)} API keys match {key_id_or_prefix!r}; give the id shown by `w2s keys list`"
            )
        row = rows[0]
        if row.revoked_at is None:
            row.revoked_at = utcnow()
    logger.info("API key %s (%s) revoked", row.id, row.name)
    return row


def authenticate(store: JobStore, key: str) -> Principal | None:
    """Return the caller of a bearer key, or None when the key is unknown or revoked."""
    with store.session() as session:
        row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(key))).first()
    if row is None or row.revoked_at is not None:
        return None
    return Principal(key_id=row.id, name=row.name, scopes=frozenset(row.scopes or []))
