"""WeCom access tokens shared by every process through the state database (gettoken is rate limited)."""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.schema import access_tokens, insert_ignore


class TokenStore:
    """get/put by key (a digest of corp id and secret, made by the WeCom client: the secret is never stored)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def get(self, key: str) -> tuple[str, float] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(access_tokens.c.access_token, access_tokens.c.expires_at)
                               .where(access_tokens.c.key == key)).first()
        return (row.access_token, row.expires_at) if row else None

    def put(self, key: str, token: str, expires_at: float) -> None:
        with self.engine.begin() as conn:
            updated = conn.execute(access_tokens.update().where(access_tokens.c.key == key)
                                   .values(access_token=token, expires_at=expires_at)).rowcount
            if not updated:
                conn.execute(insert_ignore(access_tokens),
                             {"key": key, "access_token": token, "expires_at": expires_at})
