"""The MongoDB adapter of the storage port, on PyMongo's async API (not Motor).

Every change is one atomic single-document update guarded by the job's sequence
number (optimistic concurrency): load, `service.domain.events.apply`, then
`update_one({_id, seq: old}, {$set: ...})`; a lost race reloads and recomputes.
No multi-document transactions, pipeline updates, change streams or `$push`
modifiers, so it works on a standalone server, a replica set and FerretDB.
The document shape is described in `mongo_codec`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
import os
import random
import time
import warnings
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import pymongo
from bson import Binary, ObjectId
from pymongo import (
    ASCENDING,
    DESCENDING,
    AsyncMongoClient,
    IndexModel,
    InsertOne,
    UpdateOne,
)
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.cursor import AsyncCursor
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.common import URI_OPTIONS_VALIDATOR_MAP as URI_OPTIONS
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
    WTimeoutError,
)

from jobwire.env_numbers import whole_number
from jobwire.v1 import artifact_pb2, event_pb2, job_pb2, log_pb2

from ..domain import events, validation
from ..domain.errors import Code, DomainError, StorageFailure, StorageUnavailable
from ..domain.records import (
    TERMINAL_STATES,
    Applied,
    Change,
    Claim,
    Deleted,
    JobCommand,
    JobRecord,
    Policy,
)
from ..job_locks import KeyedLocks
from ..tasks import stop_within
from . import mongo_codec as codec
from .mongo_feed import DEFAULT_MAX_DOCS, MongoEventFeed
from .port import CHUNK_SIZE, LIST_READ_BYTES, JobQuery, LogEntry

log = logging.getLogger("jobwire.store.mongo")

DEFAULT_DATABASE = "jobwire"
DEFAULT_TIMEOUT_MS = 5000
MAX_TIMEOUT_MS = 1_000_000_000  # pymongo refuses timeoutMS from here on (11.6 days)
READ_PREFERENCES = ("primary", "primaryPreferred", "secondary", "secondaryPreferred", "nearest")
# Optimistic-concurrency rounds before a command gives up with ABORTED.
MAX_ATTEMPTS = 64
# Oldest queued jobs fetched per claim round; contenders spread over them.
CLAIM_CANDIDATES = 16
CLAIM_CANDIDATES_MAX = 256
# Chunks fetched per round trip when reading an artifact.
READ_BATCH_CHUNKS = 4
# Slowest read rate allowed for before a long artifact read counts as timed out.
ARTIFACT_MIN_BYTES_PER_S = 4 * 1024 * 1024
# Time budget for deleting a replaced artifact's chunks.
HOUSEKEEPING_TIMEOUT_S = 120.0
# Chunks of an upload this old without its files document are a failed upload's (the
# store unreachable, the process killed): removed by a sweep at start and this often.
ORPHAN_AGE_S = 24 * 3600.0
ORPHAN_SWEEP_S = 6 * 3600.0
# How long close() waits for a cancelled housekeeping task.
HOUSEKEEPING_STOP_S = 5.0
# How long fetched candidates may be handed out before a fresh query (bounds how
# late this process notices a job that another process requeued).
CANDIDATE_TTL_S = 1.0
# A claim gives up (ABORTED) after this many lost races once its time budget is spent.
CLAIM_MIN_LOSSES = 16
# Writes of unknown outcome remembered (see MongoStore.settle_in_doubt), and for how long.
MAX_IN_DOUBT = 10_000
IN_DOUBT_SECONDS = 600.0
SETTLE_BATCH = 256  # jobs read back per settle
# One page of the firehose log holds at most about this many bytes of events (an event
# may be 1 MiB: 500 of them were 500 MiB in memory per stream and origin).
LOG_PAGE_BYTES = 8 * 1024 * 1024
# Log entries per reply on a server that does not cap a reply at MongoDB's 16 MiB
# (FerretDB: 60 entries of 1 MiB were one 61 MB reply, past the 48 MB message limit,
# and the driver's ProtocolError failed WatchJobs with UNKNOWN).
UNCAPPED_LOG_BATCH = 16
# Job documents per reply there (a document stays under ~11 MiB; 16 queued videos of
# 3.9 MiB were a 64 MB reply: ListJobs and ClaimJob failed with UNKNOWN, for good).
UNCAPPED_JOB_BATCH = 3

_UNAVAILABLE = (ConnectionFailure, ExecutionTimeout, WTimeoutError)
_AUTH_CODES = (18, 13)  # AuthenticationFailed, Unauthorized
_CURSOR_NOT_FOUND = 43
_SERVER_CANNOT_WRITE = (1, 14031)  # InternalError, OutOfDiskSpace
_QUEUED = job_pb2.JOB_STATE_QUEUED
_RUNNING = job_pb2.JOB_STATE_RUNNING
_BUCKET = "artifacts"
FIREHOSE = "firehose"
FIREHOSE_ORIGINS = "firehose_origins"
# Jobs being deleted: marked before anything of theirs goes (see delete_jobs).
DELETIONS = "deletions"
# One document per data migration done in the background (its _id names it).
MIGRATIONS = "migrations"
_ENDED = sorted(TERMINAL_STATES)


@contextlib.contextmanager
def _guard(what: str) -> Iterator[None]:
    """Turns the driver's connection errors, timeouts, unmet write concerns and refused
    credentials into StorageUnavailable (UNAVAILABLE: the caller retries once MongoDB is
    back or fixed)."""
    try:
        yield
    except DomainError:
        raise
    except _UNAVAILABLE as exc:
        raise StorageUnavailable(f"MongoDB unavailable ({what}): {_describe(exc)}") from exc
    except OperationFailure as exc:
        concern = _write_concern_error(exc)
        if concern is not None:
            # The write reached the primary but its write concern was not met (no
            # majority, a failover, an unknown tag): it may be rolled back, not durable.
            raise StorageUnavailable(
                f"MongoDB did not confirm the write concern ({what}): {concern}"
            ) from exc
        # Credentials refused (a rotated password, a dropped user) or a cursor lost in a
        # restart: retryable once the operator or the server has fixed it, not a bug.
        if exc.code in _AUTH_CODES:
            refused = "the credentials" if exc.code == 18 else "this operation to the user"
            raise StorageUnavailable(
                f"MongoDB refused {refused} of MONGODB_URI ({what}): {_failure(exc)}"
            ) from exc
        if exc.code == _CURSOR_NOT_FOUND:
            raise StorageUnavailable(f"MongoDB unavailable ({what}): {_describe(exc)}") from exc
        if exc.code in _SERVER_CANNOT_WRITE or exc.has_error_label("RetryableWriteError"):
            # Its disk full (MongoDB: OutOfDiskSpace; FerretDB: InternalError, "disk I/O
            # error"), or a write it says to retry: retryable, not the caller's mistake.
            raise StorageUnavailable(f"MongoDB cannot write now ({what}): {_failure(exc)}") from exc
        _raise_if_timeout(exc, what)
        # Any other code (FerretDB's NotImplemented, 238, for an option it lacks; a code
        # this adapter does not know): gRPC's UNKNOWN with a traceback, naming neither
        # the operation nor the server's code. A retry meets the same answer.
        raise StorageFailure(
            f"MongoDB failed ({what}): server error {exc.code}, {_failure(exc)}"
        ) from exc
    except PyMongoError as exc:
        _raise_if_timeout(exc, what)
        raise


def _write_concern_error(exc: OperationFailure) -> str | None:
    """The server's write concern error of a write (a bulk write's last), if any."""
    if isinstance(exc, WriteConcernError):
        details = exc.details or {}
    elif isinstance(exc, BulkWriteError):
        errors = (exc.details or {}).get("writeConcernErrors") or []
        if not errors:
            return None
        details = errors[-1]
    else:
        return None
    name = details.get("codeName") or details.get("code") or exc.code
    return f"{name}: {str(details.get('errmsg') or exc)[:300]}"


def _raise_if_timeout(exc: PyMongoError, what: str) -> None:
    if exc.timeout:
        raise StorageUnavailable(f"MongoDB timed out ({what}): {_describe(exc)}") from exc


def _failure(exc: OperationFailure) -> str:
    """The server's code name (or number) and message."""
    details = exc.details or {}
    name = details.get("codeName") or exc.code
    return f"{name}: {str(details.get('errmsg') or exc)[:300]}"


def _uri_pairs(uri: str) -> list[tuple[str, str]]:
    return parse_qsl(uri.partition("?")[2], keep_blank_values=True)


def _uri_options(uri: str) -> list[str]:
    return [key for key, _ in _uri_pairs(uri)]


def _without_credentials(text: str, uri: str) -> str:
    """`text` with the URI's user info (as written and percent-decoded) blanked out."""
    userinfo = uri.split("://", 1)[-1].rpartition("@")[0]
    secrets = {userinfo, *userinfo.split(":", 1)[1:]}
    for secret in sorted(secrets | {unquote_plus(x) for x in secrets}, key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


def _check_srv_host(uri: str) -> None:
    """A mongodb+srv:// host must be a DNS name: the driver found an IP address only at
    the first operation (a ConfigurationError traceback at start)."""
    scheme, _, rest = uri.partition("://")
    if scheme.lower() != "mongodb+srv":
        return
    host = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return
    raise ValueError(
        f"MONGODB_URI is not a valid MongoDB URI: a mongodb+srv:// URI names a DNS name"
        f" with SRV records, not an IP address ({host}); use mongodb:// for an address"
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).split(", Timeout:")[0].split(", Topology Description:")[0]
    return f"{type(exc).__name__}: {text[:300]}"


def _backoff(attempt: int) -> float:
    return random.uniform(0, min(0.05, 0.0005 * 2 ** min(attempt, 10)))


# In-process locks per job. On MongoDB they only spare this process's writers the
# lost-race retries; the conditional update (`seq` in the filter) is what keeps
# replicas correct. On FerretDB v1.24 they are required: its SQLite handler runs an
# update as an unsynchronised read-modify-write, so two concurrent updates of one
# document may both "match" and one silently overwrites the other.
_LOCKS = KeyedLocks()


@dataclass(eq=False)
class _Candidates:
    """The oldest QUEUED jobs of one kind, handed out one per claim attempt."""

    docs: collections.deque[dict[str, Any]]
    epoch: int
    fetched_at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Doubt:
    """A write sent without an answer: its ring token and the events it carries."""

    token: int
    applied: list[Applied]
    since: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Plan:
    """The commands of one job in a batch, chained in memory, and the one write."""

    job_id: str
    indices: list[int]
    results: dict[int, Change | DomainError] = field(default_factory=dict)
    write: InsertOne[Any] | UpdateOne | None = None
    created: bool = False
    new_seq: int = 0
    slot: str = ""
    token: int = 0


class MongoStore:
    """A `Store` on MongoDB >= 6.0 (or a compatible server such as FerretDB)."""

    single_writer_origin = ""  # every replica appends to the log

    def __init__(
        self,
        uri: str,
        *,
        policy: Policy | None = None,
        database: str | None = None,
        w: int | str = "majority",
        read_preference: str = "primary",
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        server_selection_timeout_ms: int | None = None,
        connect_timeout_ms: int | None = None,
        max_concurrent_writes: int | None = None,
        orphan_sweep_after_s: float = 60.0,
        **client_options: Any,
    ) -> None:
        self.policy = policy or Policy()
        # The first sweep of failed uploads' chunks, this long after start (not during
        # the start-up itself), then every ORPHAN_SWEEP_S.
        self._orphan_sweep_after_s = orphan_sweep_after_s
        self._uri = uri
        self._database_name = database or os.environ.get("JOBWIRE_MONGODB_DB") or DEFAULT_DATABASE
        self.timeout_ms = timeout_ms
        self._client_options: dict[str, Any] = {
            "w": w,
            "readPreference": read_preference,
            "timeoutMS": timeout_ms,
            "serverSelectionTimeoutMS": server_selection_timeout_ms or min(timeout_ms, 5000),
            "connectTimeoutMS": connect_timeout_ms or min(timeout_ms, 10000),
            "appname": "jobwire",
            **client_options,
        }
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        # Claim candidates per kind, and the one query per kind that refills them.
        self._candidates: dict[int, _Candidates] = {}
        self._refills: dict[int, asyncio.Future[_Candidates]] = {}
        self._valid_from: dict[int, int] = {}
        # None: as many concurrent writes as the pool allows on MongoDB, 2 on
        # FerretDB's SQLite backend (see start()); 0: never bounded.
        self._max_writes = max_concurrent_writes
        self._write_gate: asyncio.Semaphore | None = None
        # False on FerretDB: a reply is not capped at 16 MiB (see UNCAPPED_LOG_BATCH).
        self._capped_replies = True
        self._fetch_epoch = 0
        self._claimers = 0
        self._db: AsyncDatabase[dict[str, Any]] | None = None
        # This process's origin in the firehose log, and its last entry number.
        self.origin = os.urandom(6).hex()
        self._log_n = 0
        self._log_n_known = True
        self._log_lock: asyncio.Lock | None = None
        self._log_queue: list[tuple[list[Applied | Deleted], asyncio.Future[int]]] = []
        # False when the server has no TTL index (FerretDB): the store prunes itself.
        self._log_ttl = True
        self._log_pruned = 0.0
        self._log_pruning: asyncio.Future[None] | None = None
        self._orphan_sweeping: asyncio.Task[None] | None = None
        self._log_upgrade: asyncio.Task[None] | None = None
        self._uploading: set[ObjectId] = set()
        # The newest artifact of a name is the one stored last: its create_ns, made
        # strictly increasing here (two uploads stored in one clock tick keep their order).
        self._artifact_ns = 0
        self.log_failures = 0
        # Writes whose outcome is unknown (the connection failed after sending them):
        # per job, the write's ring token and its events, until settle_in_doubt() finds
        # whether they landed. A retried callback is then acknowledged as a duplicate,
        # so these events are published from here or never.
        self._in_doubt: dict[str, list[_Doubt]] = {}

    @classmethod
    def from_env(cls, policy: Policy, environ: Mapping[str, str] | None = None) -> MongoStore:
        """MONGODB_URI, JOBWIRE_MONGODB_DB, JOBWIRE_MONGODB_W (majority),
        JOBWIRE_MONGODB_TIMEOUT_MS (5000), JOBWIRE_MONGODB_READ_PREFERENCE (primary)."""
        env = os.environ if environ is None else environ
        uri = env.get("MONGODB_URI", "")
        if not uri:
            raise ValueError("MONGODB_URI is not set")
        if uri != uri.strip() or not uri.isprintable():
            # A secret file's trailing newline went into the database name ("jobwire\n":
            # another, empty database; FerretDB refused it with a traceback at start).
            raise ValueError(
                "MONGODB_URI must not begin or end with whitespace nor hold line breaks or"
                " other control characters (a secret file's trailing newline?); its value"
                " is not shown"
            )
        w_text = env.get("JOBWIRE_MONGODB_W", "majority") or "majority"
        timeout_text = env.get("JOBWIRE_MONGODB_TIMEOUT_MS", "") or str(DEFAULT_TIMEOUT_MS)
        timeout_ms = whole_number(timeout_text)
        # The driver's own bound (timeoutMS < 10**9): past it, its error blamed MONGODB_URI.
        if timeout_ms is None or not 0 < timeout_ms < MAX_TIMEOUT_MS:
            raise ValueError(
                f"JOBWIRE_MONGODB_TIMEOUT_MS must be a whole number of milliseconds from 1 to"
                f" {MAX_TIMEOUT_MS - 1}, got {timeout_text!r}"
            )
        w: int | str = w_text
        if (number := whole_number(w_text)) is not None:
            w = number
            if w < 1:  # w=0 acknowledges writes MongoDB may never make: not durable
                raise ValueError(
                    f"JOBWIRE_MONGODB_W must be majority, a number >= 1 or a tag set name,"
                    f" got {w_text!r}"
                )
        mode = env.get("JOBWIRE_MONGODB_READ_PREFERENCE", "primary") or "primary"
        if mode not in READ_PREFERENCES:
            raise ValueError(
                f"JOBWIRE_MONGODB_READ_PREFERENCE must be one of {', '.join(READ_PREFERENCES)},"
                f" got {mode!r}"
            )
        store = cls(
            uri,
            policy=policy,
            database=env.get("JOBWIRE_MONGODB_DB") or None,
            w=w,
            read_preference=mode,
            timeout_ms=timeout_ms,
        )
        store._open_client()  # a malformed URI is named now, before anything starts
        return store

    def _open_client(self) -> None:
        """Creates the client (no I/O yet: it connects on its first operation)."""
        if self._client is not None:
            return
        try:
            with warnings.catch_warnings():
                # The driver only warns about a bad or unknown URI option, and ignores it:
                # `tls=yes` would connect in the clear, `retryWrite=true` not retry.
                warnings.simplefilter("error", UserWarning)
                self._client = AsyncMongoClient(self._uri, **self._client_options)
        except (pymongo.errors.ConfigurationError, ValueError, TypeError, UserWarning) as exc:
            reason = str(exc)
            if reason.startswith("Unknown option"):
                unknown = [k for k in _uri_options(self._uri) if k.lower() not in URI_OPTIONS]
                hint = reason.removeprefix("Unknown option.").replace("Refer to docstring.", "")
                reason = f"unknown option {', '.join(map(repr, unknown))} ({hint.strip()})"
            reason = _without_credentials(reason, self._uri)
            raise ValueError(f"MONGODB_URI is not a valid MongoDB URI: {reason}") from None
        except OSError as exc:
            # The driver reads the URI's TLS files here (SSLError is an OSError): one
            # missing, a directory or not PEM was a traceback. Named by option and path
            # (the driver's words name neither the path nor, for SSL, the option).
            files = [f"{k}={v}" for k, v in _uri_pairs(self._uri) if k.lower().endswith("file")]
            reason = _without_credentials(f"{exc.strerror or exc} ({', '.join(files)})", self._uri)
            raise ValueError(f"MONGODB_URI names a TLS file it cannot use: {reason}") from None
        _check_srv_host(self._uri)
        # The database named in the URI path wins over the argument.
        try:  # (the URI's own was checked with the URI)
            db = self._client.get_default_database(default=self._database_name)
        except pymongo.errors.InvalidName as exc:
            raise ValueError(
                f"JOBWIRE_MONGODB_DB is not a valid database name, got"
                f" {self._database_name!r}: {exc}"
            ) from None
        if len(db.name.encode()) >= 64:  # MongoDB's limit, otherwise met at the first write
            source = "JOBWIRE_MONGODB_DB" if db.name == self._database_name else "MONGODB_URI"
            raise ValueError(f"{source} names a database longer than 63 bytes, got {db.name!r}")
        self._db = db

    # -- lifecycle ---------------------------------------------------------------

    @property
    def database(self) -> AsyncDatabase[dict[str, Any]]:
        if self._db is None:
            raise RuntimeError("MongoStore.start() was not called")
        return self._db

    @property
    def jobs(self) -> AsyncCollection[dict[str, Any]]:
        return self.database["jobs"]

    @property
    def logs(self) -> AsyncCollection[dict[str, Any]]:
        return self.database["logs"]

    @property
    def firehose(self) -> AsyncCollection[dict[str, Any]]:
        return self.database[FIREHOSE]

    @property
    def files(self) -> AsyncCollection[dict[str, Any]]:
        return self.database[f"{_BUCKET}.files"]

    @property
    def chunks(self) -> AsyncCollection[dict[str, Any]]:
        return self.database[f"{_BUCKET}.chunks"]

    async def start(self) -> None:
        self._open_client()
        assert self._client is not None
        with _guard("start"):
            try:
                info = await self._client.admin.command("buildInfo")
            except pymongo.errors.ConfigurationError as exc:
                # A mongodb+srv:// URI is resolved at the first operation: a name with
                # no SRV record (a typo, DNS down), a TXT record with bad options.
                reason = _without_credentials(str(exc)[:300], self._uri)
                raise StorageUnavailable(
                    f"MongoDB unavailable (start): MONGODB_URI cannot be used: {reason}"
                ) from exc
            if "ferretdbVersion" in info:
                # Measured: 2 processes x 20 concurrent callbacks for one job, 20 of the
                # 40 acknowledged events lost (both conditional updates "matched").
                log.warning(
                    "MongoDB server is FerretDB %s: it does not apply concurrent updates"
                    " of one document atomically, so run ONE service replica on it (two"
                    " replicas writing the same job lose acknowledged events)",
                    info["ferretdbVersion"],
                )
            writes = self._max_writes
            if writes is None and "ferretdbVersion" in info:
                # SQLite allows one writer; many concurrent writers only add busy-waits
                # (64 concurrent updates took ~4x longer than the same 64 in a row).
                writes = 2
            self._write_gate = asyncio.Semaphore(writes) if writes else None
            self._capped_replies = "ferretdbVersion" not in info
            # One createIndexes per index: FerretDB v1.24 drops the connection when a
            # single createIndexes names several indexes that all exist already.
            for collection, index in self._indexes():
                await collection.create_indexes([index])
            if self.policy.firehose_retention_ns > 0:
                await self._firehose_ttl()
                # The origins a reader looks at (a distinct over the log is not portable:
                # FerretDB refuses `distinct` with a time limit).
                await self.database[FIREHOSE_ORIGINS].update_one(
                    {"_id": self.origin}, {"$set": {"started_ns": time.time_ns()}}, upsert=True
                )
        if self._log_upgrade is None or self._log_upgrade.done():
            self._log_upgrade = asyncio.get_running_loop().create_task(
                self._upgrade_old_logs(), name="log-upgrade"
            )
        if self._orphan_sweeping is None or self._orphan_sweeping.done():
            self._orphan_sweeping = asyncio.get_running_loop().create_task(
                self._sweep_orphans_forever(), name="orphan-chunk-sweep"
            )

    async def _upgrade_old_logs(self) -> None:
        try:
            changed = await self.backfill_log_kinds()
            marked = await self.mark_jobless_logs()
        except (
            pymongo.errors.PyMongoError,
            StorageUnavailable,
            StorageFailure,
        ) as exc:  # next start retries
            log.warning("log lines from before LogEntry.kind or nj not updated: %s", exc)
            return
        if changed:
            log.info("gave %d log lines from before LogEntry.kind their job's kind", changed)
        if marked:
            log.info("%d log lines of ids that name no job now age out with the retention", marked)

    async def old_logs_upgraded(self) -> None:
        """Waits for the start's `backfill_log_kinds` and `mark_jobless_logs` (tests)."""
        if self._log_upgrade is not None:
            await asyncio.shield(self._log_upgrade)

    async def backfill_log_kinds(self, batch: int = 1000) -> int:
        """Log lines written before LogEntry.kind have no `kind` field, so a ListLogs
        by kind (the video worker's `GET /api/log`) never showed them. Each gets its
        job's kind, a line of no job 0 (as the embedded store's migration does: it may
        be any writer's). One pass over the jobs, `batch` ids per update, in the
        background after a start; once every line has one, a start costs one find_one."""
        missing: dict[str, Any] = {"kind": {"$exists": False}}
        with _guard("log kinds"):
            if await self.logs.find_one(missing, {"_id": 1}) is None:
                return 0
            changed = 0
            pending: dict[int, list[str]] = {}
            cursor = self.jobs.find({}, {"_id": 1, "kind": 1}).batch_size(batch)
            async for doc in cursor:
                ids = pending.setdefault(int(doc.get("kind", 0)), [])
                ids.append(doc["_id"])
                if len(ids) >= batch:
                    changed += await self._set_log_kind(missing, ids, int(doc.get("kind", 0)))
                    ids.clear()
            for kind, ids in pending.items():
                if ids:
                    changed += await self._set_log_kind(missing, ids, kind)
            async with self._writing():
                rest = await self.logs.update_many(missing, {"$set": {"kind": 0}})
            return changed + rest.modified_count

    async def mark_jobless_logs(self, batch: int = 1000) -> int:
        """Log lines written before `nj` under an id that names no job (a video id, a
        deleted job's; UNKNOWN ones age by their own time) get `nj` = now, so the
        retention deletes them too. One pass over the lines, once: a `migrations`
        document says it was done, and a start then costs one find_one."""
        done = {"_id": "jobless_logs"}
        with _guard("jobless log lines"):
            if await self.database[MIGRATIONS].find_one(done) is not None:
                return 0
            now = time.time_ns()
            marked = 0
            ids: set[str] = set()
            unmarked = {"nj": {"$exists": False}, "job_id": {"$ne": validation.UNKNOWN_JOB}}
            async for doc in self.logs.find(unmarked, {"job_id": 1}).batch_size(batch):
                ids.add(doc["job_id"])
                if len(ids) >= batch:
                    marked += await self._mark_jobless(ids, now)
                    ids = set()
            marked += await self._mark_jobless(ids, now)
            async with self._writing():
                await self.database[MIGRATIONS].update_one(
                    done, {"$set": {"done_ns": now}}, upsert=True
                )
            return marked

    async def _mark_jobless(self, ids: set[str], now_ns: int) -> int:
        if not ids:
            return 0
        cursor = self.jobs.find({"_id": {"$in": sorted(ids)}}, {"_id": 1})
        gone = sorted(ids - {doc["_id"] async for doc in cursor})
        if not gone:
            return 0
        async with self._writing():
            result = await self.logs.update_many(
                {"job_id": {"$in": gone}, "nj": {"$exists": False}}, {"$set": {"nj": now_ns}}
            )
        return int(result.modified_count)

    async def _set_log_kind(self, missing: dict[str, Any], ids: list[str], kind: int) -> int:
        async with self._writing():
            done = await self.logs.update_many(
                {**missing, "job_id": {"$in": ids}}, {"$set": {"kind": kind}}
            )
        return done.modified_count

    async def _firehose_ttl(self) -> None:
        """Expires log entries after the retention (the reads skip older ones anyway,
        so a server that deletes late, or cannot change the TTL, is still correct)."""
        seconds = max(1, self.policy.firehose_retention_ns // 10**9)
        index = IndexModel([("t", ASCENDING)], name="retention", expireAfterSeconds=seconds)
        try:
            await self.firehose.create_indexes([index])
        except pymongo.errors.OperationFailure as exc:
            try:  # the retention changed since the index was made
                await self.database.command(
                    {
                        "collMod": FIREHOSE,
                        "index": {"name": "retention", "expireAfterSeconds": seconds},
                    }
                )
            except pymongo.errors.OperationFailure:
                self._log_ttl = False
                log.warning(
                    "firehose TTL index not available (%s); the store deletes old entries"
                    " itself every minute",
                    exc,
                )

    def _indexes(self) -> list[tuple[AsyncCollection[dict[str, Any]], IndexModel]]:
        """Every index the adapter relies on (README: "Indexes")."""
        return [
            (
                self.jobs,
                IndexModel(
                    [
                        ("kind", ASCENDING),
                        ("state", ASCENDING),
                        ("create_ns", ASCENDING),
                        ("_id", ASCENDING),
                    ],
                    name="claim_queue",
                ),
            ),
            (
                self.jobs,
                IndexModel([("state", ASCENDING), ("lease_expire_ns", ASCENDING)], name="leases"),
            ),
            (
                self.jobs,
                IndexModel([("create_ns", ASCENDING), ("_id", ASCENDING)], name="list_order"),
            ),
            (self.jobs, IndexModel([("lab", ASCENDING)], name="labels")),
            (
                self.jobs,
                IndexModel([("state", ASCENDING), ("stall_ns", ASCENDING)], name="stalls"),
            ),
            (
                self.jobs,
                IndexModel([("state", ASCENDING), ("end_ns", ASCENDING)], name="ended"),
            ),
            (
                self.firehose,
                IndexModel([("o", ASCENDING), ("n", ASCENDING)], name="origin_order", unique=True),
            ),
            (
                self.logs,
                IndexModel(
                    [("job_id", ASCENDING), ("time_ns", DESCENDING), ("_id", DESCENDING)],
                    name="job_newest_first",
                ),
            ),
            (
                self.logs,
                IndexModel([("time_ns", DESCENDING), ("_id", DESCENDING)], name="newest_first"),
            ),
            (self.logs, IndexModel([("nj", ASCENDING)], name="no_job", sparse=True)),
            (self.logs, IndexModel([("k", ASCENDING)], name="log_key", unique=True, sparse=True)),
            (
                self.logs,
                IndexModel(
                    [("kind", ASCENDING), ("time_ns", DESCENDING), ("_id", DESCENDING)],
                    name="kind_newest_first",
                ),
            ),
            (self.files, IndexModel([("filename", ASCENDING), ("uploadDate", ASCENDING)])),
            (
                self.files,
                IndexModel(
                    [("metadata.job_id", ASCENDING), ("metadata.name", ASCENDING)],
                    name="job_artifacts",
                ),
            ),
            (
                self.chunks,
                IndexModel([("files_id", ASCENDING), ("n", ASCENDING)], unique=True),
            ),
        ]

    async def close(self) -> None:
        await stop_within(
            [self._log_pruning, self._orphan_sweeping, self._log_upgrade], HOUSEKEEPING_STOP_S
        )
        if self._client is not None:
            client, self._client, self._db = self._client, None, None
            await client.close()

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        """Bounds concurrent writes where the server serialises them anyway."""
        if self._write_gate is None:
            yield
        else:
            async with self._write_gate:
                yield

    async def ping(self) -> None:
        with _guard("ping"):
            await self.database.command("ping")

    # -- jobs ----------------------------------------------------------------------

    async def create(self, record: JobRecord) -> None:
        with _guard("create"):
            await self._finish_marked([record.job.id])
            try:
                async with self._writing():
                    await self.jobs.insert_one(codec.job_document(record, {}))
            except DuplicateKeyError:
                raise DomainError(
                    Code.ALREADY_EXISTS, f"job {record.job.id!r} already exists"
                ) from None

    async def get(self, job_id: str) -> JobRecord | None:
        with _guard("get"):
            doc = await self.jobs.find_one({"_id": job_id}, {"ring": 0})  # no keys
        return None if doc is None else codec.decode_read(doc)

    async def list_jobs(self, query: JobQuery) -> list[job_pb2.Job]:
        conditions: list[dict[str, Any]] = []
        if query.states:
            conditions.append({"state": {"$in": list(query.states)}})
        if query.kind:
            conditions.append({"kind": query.kind})
        if query.labels:
            conditions.append({"lab": {"$all": codec.label_terms(query.labels)}})
        past = "$lt" if query.newest_first else "$gt"
        if query.after is not None:
            after_ns, after_id = query.after
            conditions.append(
                {
                    "$or": [
                        {"create_ns": {past: after_ns}},
                        {"create_ns": after_ns, "_id": {past: after_id}},
                    ]
                }
            )
        filter_: dict[str, Any] = {"$and": conditions} if conditions else {}
        # The list_order index serves both directions.
        direction = DESCENDING if query.newest_first else ASCENDING
        with _guard("list_jobs"):
            cursor = self._job_batches(
                self.jobs.find(filter_, {"job": 1})
                .sort([("create_ns", direction), ("_id", direction)])
                .limit(max(query.limit, 0))
            )
            docs = await cursor.to_list() if query.limit > 0 else []
        return [codec.decode_job(doc) for doc in docs]

    async def apply(self, commands: Sequence[JobCommand]) -> list[Change | DomainError]:
        plans: dict[str, _Plan] = {}
        for index, command in enumerate(commands):
            plans.setdefault(command.job_id, _Plan(command.job_id, [])).indices.append(index)
        results: list[Change | DomainError | None] = [None] * len(commands)
        pending = list(plans.values())
        written: list[_Plan] = []  # whose write landed in a round
        async with _LOCKS.hold(self._lock_key(job_id) for job_id in plans):
            with _guard("apply"):
                try:
                    for attempt in range(MAX_ATTEMPTS):
                        if attempt:
                            await asyncio.sleep(_backoff(attempt))
                        docs = await self._load([p.job_id for p in pending])
                        if not attempt:  # ids whose job may be made now (AuroraCloud)
                            await self._finish_marked(
                                [p.job_id for p in pending if p.job_id not in docs]
                            )
                        # One clock reading per commit, as in the embedded store: jobs that
                        # one batch creates share a create time (ListJobs/ClaimJob order).
                        now_ns = time.time_ns()
                        for plan in pending:
                            self._compute(plan, commands, docs.get(plan.job_id), now_ns)
                        try:
                            conflicted = await self._write(pending)
                        except BaseException:
                            self._doubt(pending)  # the write may have landed: settled later
                            raise
                        for plan in pending:
                            if plan not in conflicted:
                                written.append(plan)
                                for index, outcome in plan.results.items():
                                    results[index] = outcome
                                    if (
                                        isinstance(outcome, Applied)
                                        and outcome.event.state == _QUEUED
                                    ):
                                        self._requeued(outcome.event.kind)
                        pending = conflicted
                        if not pending:
                            break
                except BaseException:
                    # Written in an earlier round (durable), yet the call fails: MongoDB
                    # lost in a later round. Their retries are duplicates, so their events
                    # are published once settled, as those of a lost reply are.
                    self._doubt(written)
                    raise
            await self._log(results)
        for plan in pending:
            for index in plan.indices:
                results[index] = DomainError(
                    Code.ABORTED,
                    f"job {plan.job_id!r} changed concurrently {MAX_ATTEMPTS} times; retry",
                )
        return [r if r is not None else DomainError(Code.ABORTED, "not applied") for r in results]

    def _lock_key(self, job_id: str) -> str:
        return f"{self.database.name}\x00{job_id}"

    def _doubt(self, plans: Sequence[_Plan]) -> None:
        for plan in plans:
            if plan.write is not None:
                applied = [o for _, o in sorted(plan.results.items()) if isinstance(o, Applied)]
                self._add_doubt(plan.job_id, plan.token, applied)

    def _add_doubt(self, job_id: str, token: int, applied: list[Applied]) -> None:
        if not applied:
            return
        self._in_doubt.setdefault(job_id, []).append(_Doubt(token, applied))
        if sum(len(d) for d in self._in_doubt.values()) > MAX_IN_DOUBT:
            oldest = min(self._in_doubt, key=lambda j: self._in_doubt[j][0].since)
            del self._in_doubt[oldest]

    async def settle_in_doubt(self) -> list[Applied]:
        """The events of in-doubt writes that did land, in the firehose log now, for
        the caller to publish. A write that did not land is forgotten once the job's
        sequence has passed it (it can no longer match); one never settled, after
        IN_DOUBT_SECONDS."""
        if not self._in_doubt:
            return []
        job_ids = sorted(self._in_doubt)[:SETTLE_BATCH]
        retention = self.policy.retention
        landed: list[Change | DomainError | None] = []
        async with _LOCKS.hold(self._lock_key(job_id) for job_id in job_ids):
            with _guard("settle_in_doubt"):
                projection = {"seq": 1}
                for job_id in job_ids:  # only the slots that tell (a ring is ~13 KB)
                    for doubt in self._in_doubt.get(job_id, []):
                        slot = codec.ring_slot(doubt.applied[-1].event.sequence, retention)
                        projection[f"ring.{slot}"] = 1
                cursor = self.jobs.find({"_id": {"$in": job_ids}}, projection)
                docs = {str(doc["_id"]): doc async for doc in cursor}
            now = time.monotonic()
            for job_id in job_ids:
                doc = docs.get(job_id) or {}
                seq = int(doc.get("seq", 0))
                ring = doc.get("ring") or {}
                open_: list[_Doubt] = []
                for doubt in self._in_doubt.pop(job_id, []):
                    first = doubt.applied[0].event.sequence
                    last = doubt.applied[-1].event.sequence
                    entry = ring.get(codec.ring_slot(last, retention)) or {}
                    if entry.get("s") == last and entry.get("w") == doubt.token:
                        landed.extend(doubt.applied)
                    elif seq < first and now - doubt.since < IN_DOUBT_SECONDS:
                        open_.append(doubt)  # may still land
                if open_:
                    self._in_doubt[job_id] = open_
            await self._log(landed)
        return [o for o in landed if isinstance(o, Applied)]

    async def _load(self, job_ids: list[str]) -> dict[str, dict[str, Any]]:
        if len(job_ids) == 1:
            doc = await self.jobs.find_one({"_id": job_ids[0]})
            return {} if doc is None else {job_ids[0]: doc}
        cursor = self._job_batches(self.jobs.find({"_id": {"$in": job_ids}}))
        return {str(doc["_id"]): doc async for doc in cursor}

    def _job_batches(self, cursor: AsyncCursor[dict[str, Any]]) -> AsyncCursor[dict[str, Any]]:
        """A cursor over job documents, in replies under the 48 MB message limit."""
        return cursor if self._capped_replies else cursor.batch_size(UNCAPPED_JOB_BATCH)

    def _compute(
        self,
        plan: _Plan,
        commands: Sequence[JobCommand],
        doc: dict[str, Any] | None,
        now_ns: int,
    ) -> None:
        """Chains the plan's commands on the loaded document and prepares one write."""
        retention = self.policy.retention
        plan.results = {}
        plan.write = None
        plan.created = False
        plan.token = random.getrandbits(62) + 1
        record = None if doc is None else codec.decode_record(doc, retention)
        ring, relaid = codec.ring_for(doc, retention)
        changed_slots: dict[str, Any] = {}
        for index in plan.indices:
            try:
                outcome = events.apply(
                    record, plan.job_id, commands[index].command, now_ns, self.policy
                )
            except DomainError as exc:
                plan.results[index] = exc
                continue
            if isinstance(outcome, Applied):
                slot = codec.ring_slot(outcome.event.sequence, retention)
                entry = codec.ring_entry(outcome.event, plan.token)
                ring[slot] = changed_slots[slot] = entry
                record = JobRecord(
                    job=outcome.record.job,
                    token_hash=outcome.record.token_hash,
                    recent_keys=codec.keys_of(codec.retained(ring, retention)),
                )
                outcome = Applied(record=record, event=outcome.event, created=outcome.created)
                plan.created = plan.created or outcome.created
                plan.new_seq = outcome.event.sequence
                plan.slot = slot
            plan.results[index] = outcome
        if record is None or not changed_slots:
            return
        # Older bodies out, in this same write, once the retained ones pass the budget.
        changed_slots.update(codec.trim_bodies(ring, retention))
        if doc is None:
            plan.write = InsertOne(codec.job_document(record, ring))
            return
        update = _update(record.job, changed_slots, ring if relaid else None)
        plan.write = UpdateOne({"_id": plan.job_id, "seq": doc["seq"]}, update)

    async def _write(self, plans: list[_Plan]) -> list[_Plan]:
        """One unordered bulk write of the plans' writes; returns the plans that lost a race."""
        writing = [p for p in plans if p.write is not None]
        if not writing:
            return []
        ops = [p.write for p in writing if p.write is not None]
        updates = sum(1 for op in ops if isinstance(op, UpdateOne))
        failed: dict[int, dict[str, Any]] = {}
        try:
            async with self._writing():
                result = await self.jobs.bulk_write(ops, ordered=False)
            matched = result.matched_count
        except BulkWriteError as exc:
            if exc.timeout or exc.details.get("writeConcernErrors"):
                raise  # not durable: the caller marks the writes in doubt
            matched = int(exc.details.get("nMatched", 0))
            failed = {int(e["index"]): e for e in exc.details.get("writeErrors", [])}
        conflicted: list[_Plan] = []
        for i, plan in enumerate(writing):
            error = failed.get(i)
            if error is None:
                continue
            if error.get("code") in (11000, 11001):
                conflicted.append(plan)  # someone else created the job first
            else:
                message = f"job {plan.job_id!r}: write failed: {error.get('errmsg', '')[:200]}"
                for index, outcome in plan.results.items():
                    if isinstance(outcome, Applied):
                        plan.results[index] = DomainError(Code.ABORTED, message)
        if matched == updates:
            return conflicted
        update_plans = [p for p in writing if isinstance(p.write, UpdateOne)]
        if matched == 0:
            return conflicted + update_plans
        return conflicted + await self._lost(update_plans)

    async def _lost(self, plans: list[_Plan]) -> list[_Plan]:
        """Which conditional updates of a partly matched bulk write did not land."""
        projection = {"seq": 1, **{f"ring.{p.slot}": 1 for p in plans}}
        cursor = self.jobs.find({"_id": {"$in": [p.job_id for p in plans]}}, projection)
        docs = {str(doc["_id"]): doc async for doc in cursor}
        lost: list[_Plan] = []
        for plan in plans:
            doc = docs.get(plan.job_id) or {}
            entry = (doc.get("ring") or {}).get(plan.slot) or {}
            if entry.get("s") == plan.new_seq:
                if entry.get("w") != plan.token:
                    lost.append(plan)
            elif int(doc.get("seq", 0)) < plan.new_seq:
                lost.append(plan)
            else:
                message = f"job {plan.job_id!r} changed too fast to confirm the write; retry"
                for index, outcome in plan.results.items():
                    if isinstance(outcome, Applied):
                        plan.results[index] = DomainError(Code.ABORTED, message)
        return lost

    async def claim(self, kind: int, worker_id: str, lease_ns: int) -> Applied | None:
        command = Claim(worker_id=worker_id, lease_ns=lease_ns)
        arrived = self._fetch_epoch
        deadline = time.monotonic() + self.timeout_ms / 1000
        self._claimers += 1
        try:
            with _guard("claim"):
                return await self._claim_loop(kind, command, arrived, deadline)
        finally:
            self._claimers -= 1

    async def _claim_loop(
        self, kind: int, command: Claim, arrived: int, deadline: float
    ) -> Applied | None:
        """Concurrent claimers of this process pop distinct candidates from one shared
        list (refilled by one query at a time), so they do not all race for the
        oldest job; the conditional update settles races with other processes."""
        lost = 0
        while True:
            batch = self._candidates.get(kind)
            if (
                batch is None
                or not batch.docs
                or batch.epoch < self._valid_from.get(kind, 0)
                or time.monotonic() - batch.fetched_at > CANDIDATE_TTL_S
            ):
                batch = await self._refill(kind)
                if not batch.docs:
                    if batch.epoch > arrived:
                        return None  # a query issued after this call began found nothing
                    continue
                if batch.epoch < self._valid_from.get(kind, 0):
                    continue
            doc = batch.docs.popleft()
            key = self._lock_key(str(doc["_id"]))
            if not await _LOCKS.try_acquire(key):
                continue  # being changed right now by this process: not a candidate
            try:
                claimed = await self._claim_one(doc, command)
            finally:
                _LOCKS.release(key)
            if claimed is not None:
                return claimed
            lost += 1
            if lost >= CLAIM_MIN_LOSSES and time.monotonic() > deadline:
                raise DomainError(Code.ABORTED, f"claim lost {lost} races in a row; retry")

    async def _refill(self, kind: int) -> _Candidates:
        """Fresh candidates of `kind`; claimers arriving meanwhile share the query."""
        refill = self._refills.get(kind)
        # A finished refill whose clean-up callback has not run yet counts as none:
        # awaiting it would not yield, and a claimer looping on its stale (empty)
        # result would spin without ever letting the event loop run that callback.
        if refill is None or refill.done():
            self._fetch_epoch += 1
            refill = asyncio.ensure_future(self._query_candidates(kind, self._fetch_epoch))
            self._refills[kind] = refill

            def done(f: asyncio.Future[_Candidates], refill: Any = refill) -> None:
                if self._refills.get(kind) is refill:
                    del self._refills[kind]
                if not f.cancelled():
                    f.exception()  # marked retrieved: each waiting claimer re-raises it

            refill.add_done_callback(done)
        return await asyncio.shield(refill)

    async def _query_candidates(self, kind: int, epoch: int) -> _Candidates:
        limit = min(CLAIM_CANDIDATES_MAX, max(CLAIM_CANDIDATES, 2 * self._claimers))
        cursor = self._job_batches(
            self.jobs.find({"kind": kind, "state": _QUEUED})
            .sort([("create_ns", ASCENDING), ("_id", ASCENDING)])
            .limit(limit)
        )
        batch = _Candidates(collections.deque(await cursor.to_list()), epoch)
        if epoch >= self._valid_from.get(kind, 0):
            self._candidates[kind] = batch
        return batch

    def _requeued(self, kind: int) -> None:
        """A job of `kind` went back to QUEUED: candidates fetched so far may miss it."""
        self._valid_from[kind] = self._fetch_epoch + 1
        self._candidates.pop(kind, None)

    async def _claim_one(self, doc: dict[str, Any], command: Claim) -> Applied | None:
        """Claims one candidate with a conditional update; None when it changed."""
        retention = self.policy.retention
        record = codec.decode_record(doc, retention)
        try:
            outcome = events.apply(record, record.job.id, command, time.time_ns(), self.policy)
        except DomainError:
            return None
        if not isinstance(outcome, Applied):
            return None
        ring, relaid = codec.ring_for(doc, retention)
        slot = codec.ring_slot(outcome.event.sequence, retention)
        token = random.getrandbits(62) + 1
        ring[slot] = codec.ring_entry(outcome.event, token)
        slots = {slot: ring[slot], **codec.trim_bodies(ring, retention)}
        try:
            async with self._writing():
                result = await self.jobs.update_one(
                    {"_id": doc["_id"], "seq": doc["seq"], "state": _QUEUED},
                    _update(outcome.record.job, slots, ring if relaid else None),
                )
        except BaseException:
            self._add_doubt(str(doc["_id"]), token, [outcome])
            raise
        if not result.matched_count:
            return None
        claimed = JobRecord(
            job=outcome.record.job,
            token_hash=outcome.record.token_hash,
            recent_keys=codec.keys_of(codec.retained(ring, retention)),
        )
        done: list[Change | DomainError | None] = [Applied(record=claimed, event=outcome.event)]
        await self._log(done)
        applied = done[0]
        assert isinstance(applied, Applied)
        return applied

    async def _log(self, into: list[Change | DomainError | None]) -> None:
        """Appends the Applied outcomes to the firehose log and sets their positions in
        `into`. Appends that arrive while one is being written share the next insert
        (claims come one by one); numbers are taken under one lock, so an origin's
        entries are written in number order. A failed append is counted and logged,
        not raised: the job changes are durable and acknowledged; only the log misses
        them (README "streams")."""
        if self.policy.firehose_retention_ns <= 0:
            return
        applied = [(i, o) for i, o in enumerate(into) if isinstance(o, Applied)]
        if not applied:
            return
        first = await self._log_entries([o for _, o in applied])
        if first:
            for k, (i, o) in enumerate(applied):
                into[i] = dataclasses.replace(o, position=(self.origin, first + k))

    async def _log_deletions(self, deleted: list[Deleted]) -> list[Deleted]:
        """Appends the deletions' entries (as _log does events); with their positions."""
        if self.policy.firehose_retention_ns <= 0 or not deleted:
            return deleted
        first = await self._log_entries(list(deleted))
        if not first:
            return deleted
        return [
            dataclasses.replace(d, position=(self.origin, first + k)) for k, d in enumerate(deleted)
        ]

    async def _log_recovered(self, recovered: list[Deleted]) -> set[str]:
        """Appends the entries of deletions cut short, each in an insert of its own (not
        one shared with events' entries, which a failed ordered insert would take with
        it): another replica finishing the same deletion may have appended it since it
        was looked for, and the insert then fails on the entry's _id, which says it is
        there. The ids whose entries are in the log (appended here or by the other
        replica); not published (no watcher waits on them: streams re-read the log)."""
        if self._log_lock is None:
            self._log_lock = asyncio.Lock()
        logged: set[str] = set()
        for deletion in recovered:
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            async with self._log_lock:
                await self._append_log([([deletion], future)])
            if future.result():  # a number, or ALREADY_LOGGED
                logged.add(deletion.job_id)
        return logged

    async def _log_entries(self, entries: list[Applied | Deleted]) -> int:
        """The first n of the entries, written in one insert with those queued beside
        them; 0 when they were not written."""
        if self._log_lock is None:
            self._log_lock = asyncio.Lock()
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._log_queue.append((entries, done))
        async with self._log_lock:
            if not done.done():
                queued, self._log_queue = self._log_queue, []
                await self._append_log(queued)
        return done.result()

    async def _append_log(
        self, queued: list[tuple[list[Applied | Deleted], asyncio.Future[int]]]
    ) -> None:
        """One ordered insert for the queued appends; each future gets its first n (0:
        not written)."""
        count = sum(len(applied) for applied, _ in queued)
        docs: list[dict[str, Any]] = []
        try:
            if not self._log_n_known:
                newest = await self.firehose.find_one(
                    {"o": self.origin}, {"n": 1}, sort=[("n", DESCENDING)]
                )
                self._log_n = int(newest["n"]) if newest else 0
                self._log_n_known = True
            now_ns = time.time_ns()
            first = self._log_n + 1
            docs = [
                {
                    "o": self.origin,
                    "n": first + k,
                    "ns": now_ns,
                    "t": datetime.fromtimestamp(now_ns / 1e9, UTC),
                    "e": Binary(o.event.SerializeToString()),
                }
                | _entry_id(o)
                for k, o in enumerate(o for applied, _ in queued for o in applied)
            ]
            async with self._writing():
                await self.firehose.insert_many(docs, ordered=True)
            self._log_n = first + count - 1
        except (PyMongoError, DomainError) as exc:
            if _logged_already(exc, docs):
                for _, future in queued:
                    future.set_result(ALREADY_LOGGED)
                return
            # Some may have landed (ordered insert): re-read the last number first.
            self._log_n_known = False
            self.log_failures += count
            log.warning("firehose log append failed for %d event(s): %s", count, exc)
            for _, future in queued:
                future.set_result(0)
            return
        except BaseException:  # cancelled: the appends that shared this insert are unknown
            self._log_n_known = False
            for _, future in queued:
                if not future.done():
                    future.set_result(0)
            raise
        for applied, future in queued:
            future.set_result(first)
            first += len(applied)
        if not self._log_ttl and time.monotonic() - self._log_pruned > 60:
            # Off the append path: the delete scans on servers without indexes.
            self._log_pruned = time.monotonic()
            self._log_pruning = asyncio.ensure_future(self._prune_log())

    async def _prune_log(self) -> None:
        cutoff = time.time_ns() - self.policy.firehose_retention_ns
        with contextlib.suppress(PyMongoError):
            async with self._writing():
                await self.firehose.delete_many({"ns": {"$lt": cutoff}})

    async def expired_leases(self, now_ns: int, limit: int) -> list[str]:
        if limit <= 0:
            return []
        with _guard("expired_leases"):
            cursor = (
                self.jobs.find({"state": _RUNNING, "lease_expire_ns": {"$lte": now_ns}}, {"_id": 1})
                .sort([("lease_expire_ns", ASCENDING)])
                .limit(limit)
            )
            return [str(doc["_id"]) async for doc in cursor]

    async def stalled_jobs(self, now_ns: int, limit: int) -> list[str]:
        if limit <= 0:
            return []
        with _guard("stalled_jobs"):
            cursor = (
                self.jobs.find({"state": _RUNNING, "stall_ns": {"$lte": now_ns}}, {"_id": 1})
                .sort([("stall_ns", ASCENDING)])
                .limit(limit)
            )
            return [str(doc["_id"]) async for doc in cursor]

    async def log_bounds(self, since_ns: int) -> dict[str, tuple[int, int]]:
        bounds: dict[str, tuple[int, int]] = {}
        origins = self.database[FIREHOSE_ORIGINS]
        with _guard("log_bounds"):
            async for doc in origins.find({}):
                origin = str(doc["_id"])
                newest = await self.firehose.find_one(
                    {"o": origin}, {"n": 1}, sort=[("n", DESCENDING)]
                )
                if newest is None:
                    if int(doc.get("started_ns", 0)) < since_ns and origin != self.origin:
                        # A process gone for longer than the retention, its entries expired.
                        await origins.delete_one({"_id": origin, "started_ns": doc["started_ns"]})
                    continue
                oldest = await self.firehose.find_one(
                    {"o": origin, "ns": {"$gt": since_ns}}, {"n": 1}, sort=[("n", ASCENDING)]
                )
                last = int(newest["n"])
                bounds[str(origin)] = (int(oldest["n"]) if oldest else last + 1, last)
        return bounds

    async def log_after(self, origin: str, n: int, since_ns: int, limit: int) -> list[LogEntry]:
        """Up to `limit` entries, fewer once they add up to LOG_PAGE_BYTES."""
        with _guard("log_after"):
            cursor = (
                self.firehose.find({"o": origin, "n": {"$gt": n}, "ns": {"$gt": since_ns}})
                .sort([("n", ASCENDING)])
                .limit(limit)
            )
            docs = await self._docs_within(cursor, LOG_PAGE_BYTES)
        return [
            LogEntry(
                origin, int(d["n"]), int(d["ns"]), event_pb2.JobEvent.FromString(bytes(d["e"]))
            )
            for d in docs
        ]

    async def _docs_within(
        self, cursor: AsyncCursor[dict[str, Any]], max_bytes: int
    ) -> list[dict[str, Any]]:
        """The cursor's documents until their bodies (`e`) add up to `max_bytes` (at
        least one), read in replies under the 48 MB message limit: a listing of large
        events or log lines read them all to answer a few, and on FerretDB, whose
        replies are not capped at 16 MiB, failed with UNKNOWN past that limit."""
        if not self._capped_replies:
            cursor = cursor.batch_size(UNCAPPED_LOG_BATCH)
        docs: list[dict[str, Any]] = []
        size = 0
        try:
            async for doc in cursor:
                docs.append(doc)
                size += len(doc["e"])
                if size >= max_bytes:
                    break
        finally:
            await cursor.close()
        return docs

    async def events_after(self, job_id: str, sequence: int) -> list[event_pb2.JobEvent]:
        with _guard("events_after"):
            doc = await self.jobs.find_one({"_id": job_id}, {"ring": 1})
        return [] if doc is None else self._events_of(doc, sequence)

    async def get_with_events(
        self, job_id: str, sequence: int
    ) -> tuple[JobRecord, list[event_pb2.JobEvent]] | None:
        with _guard("get_with_events"):
            doc = await self.jobs.find_one({"_id": job_id})  # one document: one snapshot
        return None if doc is None else (codec.decode_read(doc), self._events_of(doc, sequence))

    def _events_of(self, doc: Mapping[str, Any], sequence: int) -> list[event_pb2.JobEvent]:
        entries = codec.replayable(doc.get("ring"), self.policy.retention)
        return [codec.decode_event(e) for e in entries if int(e["s"]) > sequence]

    async def queue_depths(self) -> dict[int, int]:
        with _guard("queue_depths"):
            cursor = await self.jobs.aggregate(
                [{"$match": {"state": _QUEUED}}, {"$group": {"_id": "$kind", "n": {"$sum": 1}}}]
            )
            return {int(doc["_id"]): int(doc["n"]) async for doc in cursor}

    def event_feed(self, max_docs: int = 0) -> MongoEventFeed:
        # The tail's own client, with the store's URI and options (see mongo_feed).
        # No timeoutMS: FerretDB drops a cursor opened with a maxTimeMS after its first
        # getMore; a socket timeout above the getMore wait detects a dead server.
        options = {**self._client_options, "maxPoolSize": 1, "appname": "jobwire-feed"}
        options.pop("timeoutMS", None)
        options["socketTimeoutMS"] = 15_000
        uri = self._uri

        def tail_client() -> AsyncMongoClient[dict[str, Any]]:
            return AsyncMongoClient(uri, **options)

        return MongoEventFeed(
            self.database, tail_client=tail_client, max_docs=max_docs or DEFAULT_MAX_DOCS
        )

    # -- logs ----------------------------------------------------------------------

    async def write_log(
        self, entry: log_pb2.LogEntry, of_no_job: bool = False, key: str = ""
    ) -> log_pb2.LogEntry | None:
        with _guard("write_log"):
            try:
                async with self._writing():
                    stored = await self.logs.insert_one(codec.log_document(entry, of_no_job, key))
            except pymongo.errors.DuplicateKeyError:  # the unique index `log_key`
                earlier = await self.logs.find_one({"k": codec.log_key(entry.job_id, key)})
                if earlier is None:  # deleted meanwhile (its job's deletion): store again
                    return await self.write_log(entry, of_no_job, key)
                return codec.decode_log(earlier)
            # Asked again after the insert (`of_no_job` is what the caller read).
            there = await self.jobs.find_one({"_id": entry.job_id}, {"_id": 1}) is not None
            if there != of_no_job:
                return None
            # Its job was deleted as the line came (the deletion's delete_many of its
            # lines may have run before this insert): nothing else would take it. Or one
            # of that id was made meanwhile (CreateJob, an AuroraCloud outcome): the line
            # is that job's, and must not age out while it runs.
            change = (
                {"$unset": {"nj": ""}}
                if there
                else {"$set": {"nj": entry.record_time.ToNanoseconds()}}
            )
            async with self._writing():
                await self.logs.update_one({"_id": stored.inserted_id}, change)
            return None

    async def keyed_log(self, job_id: str, key: str) -> log_pb2.LogEntry | None:
        with _guard("keyed_log"):
            doc = await self.logs.find_one({"k": codec.log_key(job_id, key)}, {"e": 1})
        return None if doc is None else codec.decode_log(doc)

    async def list_logs(
        self, job_id: str, level: int, limit: int, kind: int = 0
    ) -> list[log_pb2.LogEntry]:
        if limit <= 0:
            return []
        filter_: dict[str, Any] = {}
        if job_id:
            filter_["job_id"] = job_id
        if kind:
            filter_["kind"] = kind
        if level:
            filter_["level"] = level
        with _guard("list_logs"):
            cursor = (
                self.logs.find(filter_, {"e": 1})
                .sort([("time_ns", DESCENDING), ("_id", DESCENDING)])
                .limit(limit)
            )
            docs = await self._docs_within(cursor, LIST_READ_BYTES)
        return [codec.decode_log(doc) for doc in docs]

    # -- artifacts (GridFS layout: <bucket>.files + <bucket>.chunks) ------------------

    async def put_artifact(
        self,
        artifact: artifact_pb2.Artifact,
        chunks: AsyncIterator[bytes],
        before_commit: Callable[[artifact_pb2.Artifact], Awaitable[None]] | None = None,
    ) -> artifact_pb2.Artifact:
        """Writes GridFS chunks one CHUNK_SIZE piece at a time (the driver's GridIn
        buffers up to 32 MB per insert), then the files document, then drops older
        files of the same name: readers see the old or the new artifact, never half."""
        file_id = ObjectId()
        digest = hashlib.sha256()
        size = 0
        number = 0
        buffer = bytearray()
        self._uploading.add(file_id)
        try:
            with _guard("put_artifact"):
                async for piece in chunks:
                    digest.update(piece)
                    size += len(piece)
                    buffer += piece
                    while len(buffer) >= CHUNK_SIZE:
                        await self._put_chunk(file_id, number, bytes(buffer[:CHUNK_SIZE]))
                        del buffer[:CHUNK_SIZE]
                        number += 1
                if buffer:
                    await self._put_chunk(file_id, number, bytes(buffer))
                    buffer = bytearray()
                stored = artifact_pb2.Artifact()
                stored.CopyFrom(artifact)
                stored.size_bytes = size
                stored.sha256 = digest.hexdigest()
                filename = codec.artifact_filename(artifact.job_id, artifact.name)
                if before_commit is not None:
                    await before_commit(stored)
                # Stamped as it is stored, not as it began: the upload stored last is
                # the artifact (newest by create_ns). By the id its upload got when it
                # began, a large upload begun first and stored last lost to a small one
                # stored before it, though acknowledged after it, and stayed for good.
                now_ns = self._artifact_ns = max(time.time_ns(), self._artifact_ns + 1)
                stored.create_time.FromNanoseconds(now_ns)
                async with self._writing():
                    await self.files.insert_one(
                        {
                            "_id": file_id,
                            "length": size,
                            "chunkSize": CHUNK_SIZE,
                            "uploadDate": datetime.fromtimestamp(now_ns / 1e9, UTC),
                            "filename": filename,
                            "metadata": codec.artifact_metadata(stored),
                        }
                    )
        except BaseException as exc:
            if not isinstance(exc, StorageUnavailable):
                # Best effort: chunks without a files document are invisible anyway,
                # and sweep_orphan_chunks() removes what is left a day later.
                with contextlib.suppress(PyMongoError):
                    await self._delete_file(file_id)
            raise
        finally:
            self._uploading.discard(file_id)
        with _guard("put_artifact"):
            # After the files document: a deletion of the job that had listed the job's
            # artifacts before it, had deleted (or marked) the job before this check.
            if await self._deleted(artifact.job_id):
                await self._delete_file(file_id)
                raise DomainError(Code.NOT_FOUND, f"job {artifact.job_id!r} not found")
            # Every file of the name but the newest, not only those stamped before this
            # one: an upload stamped before it but stored after its look (another
            # replica's: this process's uploads of a job take turns) was seen by
            # neither, and both files stayed for good. The last to look sees them all.
            named = self.files.find({"filename": filename}, {"_id": 1}).sort(_NEWEST_FIRST)
            for old in (await named.to_list())[1:]:
                await self._delete_file(old["_id"])
        return stored

    async def _sweep_orphans_forever(self) -> None:
        await asyncio.sleep(self._orphan_sweep_after_s)
        while True:
            try:
                removed = await self.sweep_orphan_chunks(time.time() - ORPHAN_AGE_S)
                finished = await self.finish_deletions()
            except Exception as exc:  # housekeeping: tried again at the next pass
                log.warning("sweep of failed uploads' chunks failed, retrying later: %s", exc)
            else:
                if removed:
                    log.info("removed the chunks of %d failed artifact uploads", removed)
                if finished:
                    log.info("finished deleting %d jobs whose deletion was cut short", finished)
            await asyncio.sleep(ORPHAN_SWEEP_S)

    async def sweep_orphan_chunks(self, started_before: float) -> int:
        """Deletes the chunks of uploads started before `started_before` (Unix seconds)
        that have no files document: a failed upload whose cleanup could not run. A
        file's id is made when its upload starts, so the chunk index walks them in
        that order, one file id per query. Returns how many uploads it removed."""
        cutoff = ObjectId.from_datetime(datetime.fromtimestamp(started_before, UTC))
        removed = 0
        after: ObjectId | None = None
        while True:
            bounds: dict[str, ObjectId] = {"$lt": cutoff}
            if after is not None:
                bounds["$gt"] = after
            with _guard("sweep_orphan_chunks"):
                chunk = await self.chunks.find_one(
                    {"files_id": bounds}, {"files_id": 1}, sort=[("files_id", ASCENDING)]
                )
                if chunk is None:
                    return removed
                after = chunk["files_id"]
                if after in self._uploading:
                    continue  # a day-long upload of this process, still going
                if await self.files.find_one({"_id": after}, {"_id": 1}) is None:
                    async with self._writing():
                        await self.chunks.delete_many({"files_id": after})
                    removed += 1

    # -- deleting (no transactions: a mark first, then the job, then its remains) -----

    async def ended_jobs(self, before_ns: int, limit: int) -> list[str]:
        if limit <= 0:
            return []
        with _guard("ended_jobs"):
            await self._add_end_times(limit)
            cursor = (
                self.jobs.find({"state": {"$in": _ENDED}, "end_ns": {"$lt": before_ns}}, {"_id": 1})
                .sort([("end_ns", ASCENDING)])
                .limit(limit)
            )
            return [str(doc["_id"]) async for doc in cursor]

    async def _add_end_times(self, limit: int) -> None:
        """end_ns for jobs that ended before it was written, a batch per call."""
        cursor = self.jobs.find(
            {"state": {"$in": _ENDED}, "end_ns": {"$exists": False}}, {"job": 1}
        ).limit(limit)
        updates = [
            UpdateOne(
                {"_id": doc["_id"]}, {"$set": {"end_ns": events.end_ns(codec.decode_job(doc))}}
            )
            for doc in await cursor.to_list()
        ]
        if updates:  # one round trip, not one per job
            async with self._writing():
                await self.jobs.bulk_write(updates, ordered=False)

    async def delete_jobs(self, job_ids: Sequence[str]) -> list[Deleted]:
        """In this order, each step durable before the next: (1) a mark per job in
        `deletions` (then the deletion's firehose event in it); (2) the job documents
        that have ended (the job and its retained events vanish together, at once), each
        deletion's firehose entry appended after; (3) their artifacts, each files
        document before its chunks; (4) their log lines; (5) the marks (one whose entry
        could not be appended stays, for finish_deletions() to append it). Readers find no job from
        (2) on, and reach artifacts only through their job; a crash after (1) leaves
        the mark, and finish_deletions() does the rest. The other way round (artifacts
        first) a crash would leave a job listing artifacts that are gone; the job
        first without a mark, artifacts nobody would ever delete."""
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return []
        now_ns = time.time_ns()
        with _guard("delete_jobs"):
            cut_short = await self._cut_short(ids)  # read before the marks are set anew
            ended = await self._ended_now(dict.fromkeys(ids, now_ns), now_ns)
            await self._mark_deletions(ids, now_ns, ended)
            return await self._finish(dict.fromkeys(ids, now_ns), cut_short, ended)

    async def _mark_deletions(
        self, ids: list[str], now_ns: int, ended: Mapping[str, event_pb2.JobEvent]
    ) -> None:
        """Step (1) of delete_jobs: each id's mark, with its deletion's firehose event.
        The mark's time says which job of the id it is for (_finish): those made before
        it. Set anew, as a mark a crash left may be older than the job of that id being
        deleted now. Not an upsert: two callers deleting one job at once (DeleteJob
        twice, the retention of two replicas) each inserted the mark, and on servers
        that do not retry an upsert losing that race (FerretDB) the loser's write
        failed, as a reply the driver could not read (KeyError 'nModified': the caller
        got UNKNOWN). So: insert them all, then update the ones marked already (after a
        crash, or by another caller since: as late). Both writes are of new documents in
        the common case (on FerretDB a bulk update of a hundred existing marks took
        seconds)."""
        marks = self.database[DELETIONS]
        try:
            async with self._writing():
                await marks.insert_many(
                    [{"_id": i, **_mark(now_ns, ended.get(i))} for i in ids], ordered=False
                )
            return
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            codes = {e.get("code") for e in errors}
            if exc.timeout or exc.details.get("writeConcernErrors") or codes - {11000, 11001}:
                raise
            marked = [ids[e["index"]] for e in errors]
        async with self._writing():
            await marks.bulk_write(
                [UpdateOne({"_id": i}, {"$set": _mark(now_ns, ended.get(i))}) for i in marked],
                ordered=False,
            )

    async def finish_deletions(self) -> int:
        with _guard("finish_deletions"):
            cursor = self.database[DELETIONS].find({}, {"_id": 1, "ns": 1}).limit(500)
            marks = {str(doc["_id"]): int(doc.get("ns", 0)) async for doc in cursor}
            if marks:
                await self._finish(marks)
        return len(marks)

    async def _finish(
        self,
        marks: Mapping[str, int],
        cut_short: list[event_pb2.JobEvent] | None = None,
        ended: Mapping[str, event_pb2.JobEvent] | None = None,
    ) -> list[Deleted]:
        """Steps (2)-(5) of delete_jobs for the marked ids (again, after a crash or
        beside another replica doing the same: each step is idempotent), each mark
        given with its time; the deletions this call made. A mark is for the job
        of its id made before it: a job of that id made since (a late AuroraCloud report
        after a deletion cut short makes one, and ends it) is another job. It was
        deleted, acknowledged outcome and all, long before the retention; now it keeps
        everything of its own and loses only what the marked job left (artifacts stored
        and lines written before the mark). A marked job that has not ended is left
        whole and loses its mark."""
        ids = list(marks)
        # A deletion's firehose entry (no transaction joins it to the job's removal): its
        # event goes into the mark before the job document is deleted, and is appended
        # after, under an _id of its own. A crash in between leaves the mark with it,
        # and a later call appends it once its job is found gone: every deletion gets
        # its entry, and only a deletion does.
        if cut_short is None:
            cut_short = await self._cut_short(ids)
        if ended is None:  # finishing marks a crash left: rare, and few
            ended = await self._ended_now(marks, time.time_ns())
            for mark in ended.values():
                async with self._writing():
                    await self.database[DELETIONS].update_one(
                        {"_id": mark.job_id}, {"$set": {"e": Binary(mark.SerializeToString())}}
                    )
        marked = list(ended.values())
        deleted: list[Deleted] = []
        if marked:
            # One by one: the ones another replica deleted meanwhile are told apart (a
            # delete_many says how many, not which). In a row, each through the write
            # gate: on FerretDB a hundred at once held a callback's commit for seconds.
            deleted = [Deleted(m) for m in marked if await self._delete_job(m)]
        mine = {(d.job_id, d.event.job_create_time.ToNanoseconds()) for d in deleted}
        recovered = [
            Deleted(e)
            for e in cut_short
            if (e.job_id, e.job_create_time.ToNanoseconds()) not in mine
            and not await self._job_made_at(e.job_id, e.job_create_time.ToNanoseconds())
        ]
        if recovered:
            written = self.firehose.find(
                {"_id": {"$in": [_entry_id(d)["_id"] for d in recovered]}}, {"_id": 1}
            )
            have = {doc["_id"] async for doc in written}
            missing = [d for d in recovered if _entry_id(d)["_id"] not in have]
            logged = {d.job_id for d in recovered} - {d.job_id for d in missing}
            if missing and self.policy.firehose_retention_ns > 0:
                logged |= await self._log_recovered(missing)
            recovered = [d for d in recovered if d.job_id not in logged]
        deleted = await self._log_deletions(deleted)
        # A deletion whose entry could not be appended keeps its mark: a later call
        # (the sweep's finish_deletions) appends it.
        unlogged = {
            d.job_id
            for d in [*recovered, *deleted]
            if d.position is None and self.policy.firehose_retention_ns > 0
        }
        cursor = self.jobs.find({"_id": {"$in": ids}}, {"create_ns": 1})
        present = {str(doc["_id"]): int(doc["create_ns"]) async for doc in cursor}
        gone = [i for i in ids if i not in present]
        if gone:
            files = self.files.find({"metadata.job_id": {"$in": gone}}, {"_id": 1})
            for doc in await files.to_list():
                await self._delete_file(doc["_id"])
            async with self._writing():
                await self.logs.delete_many({"job_id": {"$in": gone}})
        for job_id in [i for i in ids if present.get(i, 0) > marks[i]]:
            # Another job of that id since the mark: only what the marked one left.
            files = self.files.find(
                {"metadata.job_id": job_id, "metadata.create_ns": {"$lte": marks[job_id]}},
                {"_id": 1},
            )
            for doc in await files.to_list():
                await self._delete_file(doc["_id"])
            # Lines received before the mark; one stored without its receipt time, by
            # the second its id was made in.
            second = datetime.fromtimestamp(marks[job_id] // 10**9, UTC)
            older = [
                {"r": {"$lte": marks[job_id]}},
                {"r": {"$exists": False}, "_id": {"$lt": ObjectId.from_datetime(second)}},
            ]
            async with self._writing():
                await self.logs.delete_many({"job_id": job_id, "$or": older})
        async with self._writing():
            done = [i for i in ids if i not in unlogged]
            await self.database[DELETIONS].delete_many({"_id": {"$in": done}})
        return deleted

    async def _cut_short(self, ids: list[str]) -> list[event_pb2.JobEvent]:
        """The firehose events of deletions of these ids cut short (kept in their marks)."""
        cursor = self.database[DELETIONS].find({"_id": {"$in": ids}, "e": {"$exists": True}})
        return [event_pb2.JobEvent.FromString(bytes(doc["e"])) async for doc in cursor]

    async def _ended_now(
        self, marks: Mapping[str, int], now_ns: int
    ) -> dict[str, event_pb2.JobEvent]:
        """The deletion events (events.deletion, at `now_ns`) of the marked ids' jobs that
        have ended and were made before their mark."""
        cursor = self.jobs.find(
            {"_id": {"$in": list(marks)}}, {"state": 1, "create_ns": 1, "job": 1}
        )
        return {
            str(doc["_id"]): events.deletion(codec.decode_job(doc), now_ns)
            async for doc in cursor
            if doc.get("state") in _ENDED and int(doc["create_ns"]) <= marks[str(doc["_id"])]
        }

    async def _delete_job(self, mark: event_pb2.JobEvent) -> bool:
        """Deletes the ended job the deletion's event is of; False when it is not there."""
        async with self._writing():
            result = await self.jobs.delete_one(
                {
                    "_id": mark.job_id,
                    "create_ns": mark.job_create_time.ToNanoseconds(),
                    "state": {"$in": _ENDED},
                }
            )
        return result.deleted_count == 1

    async def _job_made_at(self, job_id: str, create_ns: int) -> bool:
        """The job of that id made at `create_ns` is still there (not deleted)."""
        doc = await self.jobs.find_one({"_id": job_id, "create_ns": create_ns}, {"_id": 1})
        return doc is not None

    async def _finish_marked(self, job_ids: Sequence[str]) -> None:
        """Finishes a deletion of these ids that was cut short (MongoDB lost mid-way, a
        crash) before a job of one is made: until the housekeeping pass (up to 6 h) the
        new job listed the deleted one's log lines and artifacts as its own."""
        if not job_ids:
            return
        cursor = self.database[DELETIONS].find({"_id": {"$in": list(job_ids)}}, {"ns": 1})
        marks = {str(doc["_id"]): int(doc.get("ns", 0)) async for doc in cursor}
        if marks:
            await self._finish(marks)

    async def _deleted(self, job_id: str) -> bool:
        """The job is gone, or being deleted (marked after it was made, see _finish)."""
        job = await self.jobs.find_one({"_id": job_id}, {"create_ns": 1})
        if job is None:
            return True
        mark = await self.database[DELETIONS].find_one({"_id": job_id}, {"ns": 1})
        return mark is not None and int(job["create_ns"]) <= int(mark.get("ns", 0))

    async def delete_jobless_logs(self, before_ns: int, limit: int) -> int:
        deleted = await self._delete_logs({"nj": {"$lt": before_ns}}, "nj", limit)
        # UNKNOWN lines from before `nj`, by their own time, as they were.
        unmarked = {
            "job_id": validation.UNKNOWN_JOB,
            "time_ns": {"$lt": before_ns},
            "nj": {"$exists": False},
        }
        return deleted + await self._delete_logs(unmarked, "time_ns", limit - deleted)

    async def _delete_logs(self, filter_: dict[str, Any], oldest: str, limit: int) -> int:
        """Deletes up to `limit` lines matching `filter_`, the lowest `oldest` first."""
        if limit <= 0:
            return 0
        with _guard("delete_jobless_logs"):
            cursor = self.logs.find(filter_, {"_id": 1}).sort([(oldest, ASCENDING)]).limit(limit)
            ids = [doc["_id"] async for doc in cursor]
            if not ids:
                return 0
            async with self._writing():
                result = await self.logs.delete_many({"_id": {"$in": ids}})
            return int(result.deleted_count)

    async def _delete_file(self, file_id: ObjectId) -> None:
        """The files document first (that version vanishes at once), then its chunks.
        Deleting a large file's chunks can take a slow server a while (FerretDB: ~6 s
        for 200 MiB), so this step gets a longer time budget than a request."""
        with pymongo.timeout(max(self.timeout_ms / 1000, HOUSEKEEPING_TIMEOUT_S)):
            async with self._writing():
                await self.files.delete_one({"_id": file_id})
            async with self._writing():
                await self.chunks.delete_many({"files_id": file_id})

    async def _put_chunk(self, file_id: ObjectId, number: int, data: bytes) -> None:
        async with self._writing():
            await self.chunks.insert_one(
                {
                    "files_id": file_id,
                    "n": number,
                    "data": Binary(data),
                }
            )

    async def open_artifact(
        self, job_id: str, name: str
    ) -> tuple[artifact_pb2.Artifact, AsyncIterator[bytes]] | None:
        with _guard("open_artifact"):
            file_doc = await self.files.find_one(
                {"filename": codec.artifact_filename(job_id, name)}, sort=_NEWEST_FIRST
            )
        if file_doc is None:
            return None
        return codec.decode_artifact(file_doc), self._read_chunks(file_doc)

    async def _read_chunks(self, file_doc: Mapping[str, Any]) -> AsyncIterator[bytes]:
        """The content in CHUNK_SIZE pieces, a few stored chunks per round trip (FerretDB
        does not cap a reply batch at the 48 MB message limit by itself)."""
        name = file_doc.get("filename")
        length = int(file_doc.get("length", 0))
        # A server without the {files_id, n} index (FerretDB) sorts every chunk before
        # answering the first batch: allow for reading the file at a modest rate.
        budget = max(self.timeout_ms / 1000, length / ARTIFACT_MIN_BYTES_PER_S)
        pending = bytearray()
        received = 0
        expected_n = 0
        with _guard("read_artifact"):
            cursor = (
                self.chunks.find({"files_id": file_doc["_id"]}, {"n": 1, "data": 1})
                .sort([("n", ASCENDING)])
                .batch_size(READ_BATCH_CHUNKS)
            )
        try:
            while True:
                with _guard("read_artifact"), pymongo.timeout(budget):
                    try:
                        chunk = await cursor.next()
                    except StopAsyncIteration:
                        break
                if int(chunk["n"]) != expected_n:
                    raise DomainError(Code.ABORTED, f"artifact {name!r} is incomplete")
                expected_n += 1
                data = bytes(chunk["data"])
                received += len(data)
                if not pending and len(data) == CHUNK_SIZE:
                    yield data
                    continue
                pending += data
                while len(pending) >= CHUNK_SIZE:
                    yield bytes(pending[:CHUNK_SIZE])
                    del pending[:CHUNK_SIZE]
        finally:
            with contextlib.suppress(PyMongoError):
                await cursor.close()
        if pending:
            yield bytes(pending)
        if received != length:
            raise DomainError(Code.ABORTED, f"artifact {name!r} was replaced; read it again")

    async def list_artifacts(self, job_id: str) -> list[artifact_pb2.Artifact]:
        with _guard("list_artifacts"):
            cursor = self.files.find({"metadata.job_id": job_id}).sort(
                [("metadata.name", ASCENDING), *_NEWEST_FIRST]
            )
            docs = await cursor.to_list()
        newest: dict[str, artifact_pb2.Artifact] = {}
        for doc in docs:
            artifact = codec.decode_artifact(doc)
            newest.setdefault(artifact.name, artifact)
        return [newest[name] for name in sorted(newest)]


# The artifact of a name: the one stored last (create_ns is stamped as it is stored).
_NEWEST_FIRST = [("metadata.create_ns", DESCENDING), ("_id", DESCENDING)]


def _update(
    job: job_pb2.Job, slots: Mapping[str, Any], whole_ring: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The snapshot and the changed ring slots (or the whole ring, when re-laid out)."""
    fields = codec.snapshot_fields(job)
    if whole_ring is not None:
        fields["ring"] = dict(whole_ring)
    else:
        fields.update({f"ring.{slot}": entry for slot, entry in slots.items()})
    update: dict[str, Any] = {"$set": fields}
    lease = codec.lease_ns(job)
    unset: dict[str, str] = {}
    if lease is None:
        unset["lease_expire_ns"] = ""
    else:
        fields["lease_expire_ns"] = lease
    stall = events.stall_due_ns(job)
    if stall is None:
        unset["stall_ns"] = ""
    else:
        fields["stall_ns"] = stall
    if unset:
        update["$unset"] = unset
    return update


def _entry_id(entry: Applied | Deleted) -> dict[str, Any]:
    """A deletion's firehose entry has an _id of its own (the job's id and create time):
    a deletion finished after a crash finds whether its entry was written."""
    if not isinstance(entry, Deleted):
        return {}
    return {"_id": f"{DELETION_ENTRY}{entry.job_id}:{entry.event.job_create_time.ToNanoseconds()}"}


def _mark(now_ns: int, deletion: event_pb2.JobEvent | None) -> dict[str, Any]:
    """A `deletions` mark: its time, and the firehose event of the deletion it is for."""
    if deletion is None:
        return {"ns": now_ns}
    return {"ns": now_ns, "e": Binary(deletion.SerializeToString())}


# A deletion's firehose entry's _id starts so (_entry_id).
DELETION_ENTRY = "deleted:"
# _append_log's answer for an entry another replica appended first (its _id taken).
ALREADY_LOGGED = -1


def _logged_already(exc: BaseException, docs: list[dict[str, Any]]) -> bool:
    """The insert was of one deletion's entry (an _id of its own) and failed on that _id:
    the entry is in the log already. The driver gives every inserted document an _id, so
    an event's entry has one too after the insert: only a deletion's is of _entry_id's
    form, and a duplicate of its number (another origin's entry there) is a failure."""
    if len(docs) != 1 or not isinstance(exc, BulkWriteError):
        return False
    if not str(docs[0].get("_id", "")).startswith(DELETION_ENTRY):
        return False
    errors = exc.details.get("writeErrors", [])
    return bool(errors) and all(
        e.get("code") == 11000 and e.get("keyPattern", {"_id": 1}) == {"_id": 1} for e in errors
    )
