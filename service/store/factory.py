"""Picks the store: MongoDB when MONGODB_URI is set, the embedded store otherwise."""

from __future__ import annotations

from ..config import Settings
from .embedded import EmbeddedStore
from .port import Store


def open_store(settings: Settings) -> Store:
    policy = settings.policy()
    if settings.mongodb_uri:
        from .mongo import MongoStore  # imported lazily: the embedded path needs no driver

        try:
            return MongoStore.from_env(policy)
        except ValueError as err:  # one line naming the setting, as config.py's errors
            raise SystemExit(str(err)) from None
    return EmbeddedStore(settings.data_dir, policy, cache_jobs=settings.embedded_cache_jobs)
