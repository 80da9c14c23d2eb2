"""The MongoDB event feed: a capped collection tailed with a tailable, awaitData cursor.

Why not change streams: they need a replica set (or sharded cluster) and FerretDB
has none, while capped collections and tailable cursors work on a standalone
server, a replica set and FerretDB v1.24. One document per applied event:

    {_id: ObjectId, o: origin (the writing replica), j: job id, s: sequence, e: JobEvent bytes,
     p: [log origin, n] (its firehose position, when it has one)}

The cursor is opened with `{_id: {$gte: anchor}}` where the anchor is a document
that exists (a tailable cursor whose first query matches nothing is dead on
MongoDB and breaks on FerretDB), so an empty feed first gets a marker document.
ObjectIds come from each replica's clock, so after an error the cursor re-opens
from the last seen `_id` minus `REOPEN_MARGIN`: entries written meanwhile by a
replica whose clock lags are not skipped, and the few repeated ones are dropped
by (job id, sequence) downstream.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from bson import Binary, Int64, ObjectId
from bson.son import SON
from pymongo import AsyncMongoClient, WriteConcern
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import CollectionInvalid, OperationFailure, PyMongoError

from jobwire.v1 import event_pb2

from ..domain.errors import StorageUnavailable
from ..domain.records import LogPosition
from .port import FeedUnsupported

COLLECTION = "feed"
DEFAULT_SIZE_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_DOCS = 20_000
# How long a getMore waits for new entries before returning an empty batch.
AWAIT_MS = 1000
REOPEN_MARGIN = dt.timedelta(seconds=10)
_NAMESPACE_EXISTS = 48


class MongoEventFeed:
    """`EventFeed` on a capped collection of the store's database."""

    def __init__(
        self,
        database: AsyncDatabase[dict[str, Any]],
        *,
        tail_client: Callable[[], AsyncMongoClient[dict[str, Any]]] | None = None,
        size_bytes: int = DEFAULT_SIZE_BYTES,
        max_docs: int = DEFAULT_MAX_DOCS,
        await_ms: int = AWAIT_MS,
    ) -> None:
        self._db = database
        # The tail runs on its own one-connection client: a cursor must be continued
        # on the connection that opened it on FerretDB, and a getMore that waits for
        # data must not hold one of the store's pooled connections.
        self._make_tail_client = tail_client
        self._tail_client: AsyncMongoClient[dict[str, Any]] | None = None
        self._tail_db = database
        self._size = size_bytes
        self._max = max_docs
        self._await_ms = await_ms
        self._anchor: ObjectId | None = None
        self._resumed = False

    @property
    def collection(self) -> AsyncCollection[dict[str, Any]]:
        return self._db[COLLECTION]

    async def open(self) -> None:
        try:
            try:
                await self._db.create_collection(
                    COLLECTION, capped=True, size=self._size, max=self._max
                )
            except CollectionInvalid:
                pass  # another replica created it
            except OperationFailure as exc:
                if exc.code != _NAMESPACE_EXISTS:
                    raise FeedUnsupported(f"cannot create capped collection: {exc}") from None
            options = await self.collection.options()
        except PyMongoError as exc:
            raise StorageUnavailable(f"MongoDB unavailable (feed): {exc}") from exc
        if not options.get("capped"):
            raise FeedUnsupported(f"collection {COLLECTION!r} exists and is not capped")

    async def append(
        self,
        origin: str,
        events: Sequence[event_pb2.JobEvent],
        positions: Sequence[LogPosition | None] = (),
    ) -> None:
        if not events:
            return
        docs: list[dict[str, Any]] = [
            {
                "_id": ObjectId(),
                "o": origin,
                "j": e.job_id,
                "s": e.sequence,
                "e": Binary(e.SerializeToString()),
            }
            for e in events
        ]
        for doc, position in zip(docs, positions, strict=False):
            if position is not None:
                doc["p"] = list(position)
        # w=1: each event is already durable in its job's ring (written with the
        # store's write concern before this); the feed only carries it to watchers.
        collection = self.collection.with_options(write_concern=WriteConcern(w=1))
        try:
            await collection.insert_many(docs, ordered=True)
        except PyMongoError as exc:
            raise StorageUnavailable(f"MongoDB unavailable (feed append): {exc}") from exc

    async def close(self) -> None:
        if self._tail_client is not None:
            client, self._tail_client = self._tail_client, None
            await client.close()

    async def tail(
        self,
    ) -> AsyncIterator[list[tuple[str, event_pb2.JobEvent, LogPosition | None]]]:
        if self._tail_client is None and self._make_tail_client is not None:
            self._tail_client = self._make_tail_client()
            self._tail_db = self._tail_client[self._db.name]
        try:
            cursor_id = 0
            while True:
                if cursor_id == 0:
                    cursor_id, batch = await self._open_cursor()
                    if cursor_id == 0 and not batch:
                        self._anchor = None  # the feed was emptied or dropped: start over
                        await asyncio.sleep(0.1)
                        continue
                else:
                    reply = await self._tail_db.command(
                        SON(
                            [
                                ("getMore", Int64(cursor_id)),
                                ("collection", COLLECTION),
                                ("maxTimeMS", self._await_ms),
                            ]
                        )
                    )
                    cursor_id = int(reply["cursor"]["id"])
                    batch = reply["cursor"]["nextBatch"]
                out = self._decode(batch)
                if out:
                    yield out
                if cursor_id == 0:
                    await asyncio.sleep(0.01)  # dead cursor: re-open from the anchor
        except PyMongoError as exc:
            self._resumed = True
            raise StorageUnavailable(f"MongoDB unavailable (feed tail): {exc}") from exc

    async def _open_cursor(self) -> tuple[int, list[dict[str, Any]]]:
        if self._anchor is None:
            feed = self._tail_db[COLLECTION]
            newest = await feed.find_one({}, {"_id": 1}, sort=[("$natural", -1)])
            if newest is None:
                newest = {"_id": ObjectId(), "o": "", "marker": True}
                await feed.insert_one(newest)
            self._anchor = newest["_id"]
            start = self._anchor
        elif self._resumed:
            # Entries of replicas whose clock lags ours may sit just below the anchor.
            start = ObjectId.from_datetime(self._anchor.generation_time - REOPEN_MARGIN)
        else:
            start = self._anchor
        reply = await self._tail_db.command(
            SON(
                [
                    ("find", COLLECTION),
                    ("filter", {"_id": {"$gte": start}}),
                    ("tailable", True),
                    ("awaitData", True),
                    ("batchSize", 0),
                ]
            )
        )
        cursor_id = int(reply["cursor"]["id"])
        self._resumed = False
        return cursor_id, list(reply["cursor"]["firstBatch"])

    def _decode(
        self, batch: list[dict[str, Any]]
    ) -> list[tuple[str, event_pb2.JobEvent, LogPosition | None]]:
        out: list[tuple[str, event_pb2.JobEvent, LogPosition | None]] = []
        for doc in batch:
            if doc["_id"] == self._anchor:
                continue
            self._anchor = doc["_id"]
            if "e" in doc:
                p = doc.get("p")
                position = (str(p[0]), int(p[1])) if isinstance(p, list) and len(p) == 2 else None
                event = event_pb2.JobEvent.FromString(bytes(doc["e"]))
                out.append((str(doc.get("o", "")), event, position))
        return out
