"""The two stores checked against each other through the real gRPC API.

One seeded random sequence of operations (create with client and generated ids,
single and batched events with repeated idempotency keys and events after the end,
out-of-range values and odd strings, claims with long and lapsing leases, cancels
and the retries after them, reads, ListJobs with every filter paged to the end,
logs, artifacts, event replay and WatchJob from various sequences, jobs that stall
(progress deadlines of 1 ms), restarts at another retention, and at the end the
whole firehose) is applied in the same order
to one service on the embedded store and one on MongoDB (FerretDB), and every
answer of the two must be the same once normalised for what legitimately differs:

- the service's clock: server-set timestamps are present on both but not compared,
  and an ERROR line's idempotency key is a digest of the stored line (with its
  record time);
- generated job ids (UUIDs) and callback tokens: each run's are mapped to the
  embedded run's (ids) or a placeholder (tokens) before comparing;
- `next_page_token` bytes: they encode the (create time, id) of a page's last job,
  so only whether there is a next page is compared; each run pages with its own;
- WatchJobs positions name a store's log origin (one for the embedded store, one per
  process on MongoDB): only whether there is one is compared.

One behaviour differs on purpose and is kept out of the sequence: a retention
lowered and then raised again (README, MongoDB).

A difference fails the test with the seed, the operation's number and a diff of the
two answers. JOBWIRE_FUZZ_SEED (default: random, printed) and JOBWIRE_FUZZ_CASES
(default 200 operations, about 5 s) size it and make a failure reproducible.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import hashlib
import math
import os
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import text_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from jobwire.v1 import job_pb2, job_service_pb2, log_pb2
from service.domain.records import Policy
from service.store.embedded import EmbeddedStore
from service.store.mongo import MongoStore
from tests.conftest import ServiceHandle, start_service

SEED = int(os.environ.get("JOBWIRE_FUZZ_SEED", str(random.randrange(2**32))))
CASES = int(os.environ.get("JOBWIRE_FUZZ_CASES", "200"))
# Small, so that the ring of retained events and keys overflows within a few events.
RETENTION = 8
STREAM_WAIT = 10.0
LOG_KEY = re.compile("log:[0-9a-f]{64}")

# Enum values as plain ints (out-of-range ones are mixed in on purpose).
KINDS: list[Any] = [
    job_pb2.JOB_KIND_BATCH,
    job_pb2.JOB_KIND_VIDEO,
    job_pb2.JOB_KIND_TRANSCODE,
    job_pb2.JOB_KIND_EXTRACTION,
    job_pb2.JOB_KIND_GENERIC,
]
STATES: list[Any] = [1, 2, 3, 4, 5]
LEVELS: list[Any] = [1, 2, 3, 4]
# Label keys and values: plain, non-ASCII (BMP and beyond), JSON- and path-special.
LABEL_KEYS = ["team", "größe", "🙂", 'say "hi"', "a.b", "$x", "back\\slash", "[0]"]
LABEL_VALUES = ["a", "b", "", "ä€𝄞", "1", "true", "null", " spaced "]
ODD = [
    "",
    "plain",
    "ä€𝄞\u202e",
    "🙂" * 20,
    "\x00nul",
    "tab\tnew\nline",
    "x" * 300,
    "\ufeff",
    "'quoted' \"double\" \\back",
    "$set",
    '{"json": 1}',
]
ARTIFACT_NAMES = ["out.txt", "images.zip", "a-b_c.1", "x" * 200, "y" * 255, "-", "..."]


# Log lines the test writes carry a given time before this or the service's clock.
SERVICE_CLOCK_FROM = 1_760_000_000


def _zero_server_clock(msg: Message) -> None:
    """Server-set timestamps stay present (their presence is compared) but read 0."""
    clocks = {
        "jobwire.v1.Job": (
            "create_time",
            "update_time",
            "start_time",
            "end_time",
            "lease_expire_time",
            "last_event_time",
        ),
        "jobwire.v1.JobEvent": ("create_time", "job_create_time"),
        "jobwire.v1.Artifact": ("create_time",),
        "jobwire.v1.LogEntry": ("record_time",),
    }
    names = list(clocks.get(msg.DESCRIPTOR.full_name, ()))
    if isinstance(msg, log_pb2.LogEntry) and msg.time.seconds >= SERVICE_CLOCK_FROM:
        names.append("time")
    for name in names:
        if msg.HasField(name):
            getattr(msg, name).Clear()
            getattr(msg, name).SetInParent()
    for fd, value in msg.ListFields():
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            continue
        for item in value if fd.is_repeated else [value]:
            _zero_server_clock(item)


@dataclass
class Side:
    """One service under test and what its answers need to be compared."""

    name: str
    handle: ServiceHandle
    # Starts the service again on the same data, with this retention (Fuzz.restart).
    reopen: Callable[[int], Awaitable[ServiceHandle]]
    # Generated job ids of this run -> the embedded run's ids (identity there).
    ids: dict[str, str] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)

    @property
    def stub(self) -> Any:
        return self.handle.stub

    def show(self, value: Any) -> Any:
        """An answer as comparable data: messages as text, ids mapped, tokens hidden."""
        if isinstance(value, Message):
            copy = type(value)()
            copy.CopyFrom(value)
            _zero_server_clock(copy)
            text = text_format.MessageToString(copy, as_utf8=True)
        elif isinstance(value, (list, tuple)):
            return [self.show(v) for v in value]
        else:
            text = str(value)
        for token in self.tokens:
            text = text.replace(token, "<token>")
        # An ERROR line's key is the digest of the stored line, whose record_time is
        # the service's clock.
        text = LOG_KEY.sub("log:<digest>", text)
        for own, canonical in self.ids.items():
            text = text.replace(own, canonical)
        return text


TokenOf = Callable[["LogicalJob", int], str]


@dataclass
class LogicalJob:
    ids: tuple[str, str]  # (embedded, mongo)
    tokens: tuple[str, str]
    kind: int
    keys: list[str] = field(default_factory=list)


def _lines(shown: Any) -> list[str]:
    if isinstance(shown, list):
        return [f"[{i}] {line}" for i, item in enumerate(shown) for line in _lines(item)]
    return [line[:200] for line in str(shown).splitlines()]


async def _answer(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except grpc.aio.AioRpcError as err:
        return f"ERROR {err.code().name}: {err.details()}"


class Fuzz:
    """Builds each random operation once and runs it on both sides."""

    def __init__(self, rng: random.Random, sides: tuple[Side, Side]) -> None:
        self.rng = rng
        self.sides = sides
        self.jobs: list[LogicalJob] = []
        self.n = 0
        self.trace: list[str] = []
        self.seen: dict[str, int] = {}  # answers per method, printed at the end
        self.uploaded: list[tuple[LogicalJob, str]] = []
        self.retention = RETENTION
        self.retention_step = rng.choice([0.5, 2.0])  # each restart may lower / raise it

    # -- choosing ----------------------------------------------------------------

    def odd(self) -> str:
        return self.rng.choice(ODD)

    def pick(self) -> LogicalJob:
        """A known job, or now and then one that does not exist or is no valid id."""
        r = self.rng.random()
        if self.jobs and r < 0.6:  # mostly the newest few: long histories, full rings
            return self.rng.choice(self.jobs[-4:])
        if self.jobs and r < 0.93:
            return self.rng.choice(self.jobs)
        bad = self.rng.choice(["nope", "", "bad id/", "UNKNOWN"])
        return LogicalJob((bad, bad), ("", ""), 0)

    def labels(self, most: int = 3) -> dict[str, str]:
        return {
            self.rng.choice(LABEL_KEYS): self.rng.choice(LABEL_VALUES)
            for _ in range(self.rng.randint(0, most))
        }

    def token(self) -> TokenOf:
        """No callback token (most calls), the job's own, or a wrong one."""
        r = self.rng.random()
        if r < 0.6:
            return lambda job, side: ""
        if r < 0.9:
            return lambda job, side: job.tokens[side]
        return lambda job, side: "wrong-token"

    def key(self, job: LogicalJob | None) -> str:
        """A fresh key, or one used before (old ones probe the edge of the window)."""
        if job is not None and job.keys and self.rng.random() < 0.35:
            edge = job.keys[-RETENTION - 3 : -RETENTION + 3]  # around the window's edge
            return self.rng.choice(edge if edge and self.rng.random() < 0.5 else job.keys)
        key = f"k{self.n}-{self.rng.randrange(10**6)}"
        r = self.rng.random()
        if r < 0.3:  # the bridge's form (a prefix and a body digest: stored packed)
            key = "batch:" + hashlib.sha256(key.encode()).hexdigest()
        elif r < 0.35:
            key = self.rng.choice(["a\x1fb", "\x1e", "ü-", '["json"]', " "]) + key
        if job is not None:
            job.keys.append(key)
        return key

    # -- running -------------------------------------------------------------------

    async def both(self, what: str, run: Callable[[Side, int], Awaitable[Any]]) -> list[Any]:
        """Runs `run` on each side in turn (never concurrently: the order of
        operations is the one thing both runs must share) and compares the answers."""
        self.trace.append(f"#{self.n} {what}")
        answers = [await run(side, i) for i, side in enumerate(self.sides)]
        outcome = answers[0].split(":")[0] if isinstance(answers[0], str) else "OK"
        tally = f"{what.split()[0]} {outcome}"
        self.seen[tally] = self.seen.get(tally, 0) + 1
        shown = [side.show(a) for side, a in zip(self.sides, answers, strict=True)]
        if shown[0] != shown[1]:
            diff = difflib.unified_diff(
                _lines(shown[0]), _lines(shown[1]), "embedded", "mongo", lineterm="", n=6
            )
            raise AssertionError(
                f"stores differ at operation #{self.n} ({what}); JOBWIRE_FUZZ_SEED={SEED}"
                f" JOBWIRE_FUZZ_CASES={CASES} reproduces\n"
                + "\n".join(list(diff)[:150])
                + "\n--- last operations:\n"
                + "\n".join(self.trace[-25:])
            )
        return answers

    async def step(self) -> None:
        self.n += 1
        ops: list[tuple[int, Callable[[], Awaitable[None]]]] = [
            (7, self.create),
            (20, self.report),
            (3, self.burst),
            (8, self.batch),
            (6, self.claim),
            (3, self.cancel),
            (6, self.get),
            (8, self.list_jobs),
            (6, self.write_log),
            (4, self.list_logs),
            (4, self.upload),
            (3, self.read_artifact),
            (2, self.list_artifacts),
            (5, self.list_events),
            (5, self.watch),
            (2, self.restart),
            (2, self.stall),
        ]
        if len(self.jobs) < 3:
            await self.create()
            return
        weights = [w for w, _ in ops]
        (_, op) = self.rng.choices(ops, weights)[0]
        await op()

    # -- operations ----------------------------------------------------------------

    async def restart(self) -> None:
        """Both services stopped and started again on their data, now and then with
        another JOBWIRE_EVENT_RETENTION: what a job's record holds must survive (e.g.
        the idempotency keys, cached in the embedded store), and both must then keep
        the same events (the ring of the MongoDB store is laid out by the retention).
        A run changes it one way only: raised again after it was lowered, MongoDB may
        show events the lowered run no longer kept (the README says so)."""
        if self.rng.random() < 0.4:
            self.retention = max(4, min(32, int(self.retention * self.retention_step)))
        retention = self.retention
        self.trace.append(f"#{self.n} restart retention={retention}")
        for side in self.sides:
            await side.handle.close()
            side.handle = await side.reopen(retention)

    async def stall(self) -> None:
        """A job with a progress deadline of 1 ms: each report is followed by a STALLED
        event (a sweep of the service, waited for on both runs); with a stall failure
        deadline it fails at once, else it is cancelled after a few reports. Reports
        retried after that probe the keys around the STALLED events."""
        fail = self.rng.random() < 0.4
        job_id = f"stall-{self.n}"
        template = job_pb2.Job(kind=job_pb2.JOB_KIND_EXTRACTION)
        template.progress_deadline.FromMilliseconds(1)
        if fail:
            template.stall_fail_after.FromMilliseconds(3)

        async def create(side: Side, _: int) -> Any:
            request = job_service_pb2.CreateJobRequest(job=template, job_id=job_id)
            answer = await _answer(side.stub.CreateJob(request))
            if isinstance(answer, job_service_pb2.CreateJobResponse):
                side.tokens.add(answer.callback_token)
            return answer

        await self.both(f"CreateJob {job_id} (stalls)", create)
        job = LogicalJob((job_id, job_id), ("", ""), template.kind)
        for _ in range(1 if fail else self.rng.randint(2, RETENTION)):
            key = self.key(job)

            async def report(side: Side, _: int, key: str = key) -> Any:
                request = job_service_pb2.ReportEventRequest(
                    job_id=job_id, idempotency_key=key, progress=job_pb2.Progress(percent=9)
                )
                answer = await _answer(side.stub.ReportEvent(request))
                await _until(side, job_id, lambda j: j.stalled or j.state in TERMINAL, "stalled")
                if fail:
                    await _until(side, job_id, lambda j: j.state in TERMINAL, "failed")
                return answer

            await self.both(f"ReportEvent {job_id} progress {key} (then STALLED)", report)
        if not fail:
            await self.cancel(job)
        await self.retry(job)
        self.jobs.append(job)

    async def create(self) -> None:
        rng = self.rng
        kind = rng.choice([*KINDS, 0] if rng.random() < 0.05 else KINDS)
        job = job_pb2.Job(kind=kind, labels=self.labels())
        # A VIDEO job needs its url (a few go without: refused alike by both stores).
        if kind == job_pb2.JOB_KIND_VIDEO and rng.random() < 0.95:
            job.video.url = "https://example.invalid/" + self.odd()
            job.video.title = self.odd()
        if rng.random() < 0.2:  # long enough never to fire during the test
            job.progress_deadline.FromSeconds(3600)
            job.stall_fail_after.FromSeconds(7200)
        r = rng.random()
        if r < 0.45:
            client_ids = ("", "")  # generated
        elif r < 0.55 and self.jobs:
            client_ids = rng.choice(self.jobs).ids  # taken
        elif r < 0.6:
            client_ids = (bad := rng.choice(["bad/id", ".", "x" * 129]), bad)
        else:
            new = rng.choice(["c", "job:", "a.b-c_", "Z"]) + str(self.n)
            client_ids = (new, new)

        embedded_id: list[str] = []

        async def run(side: Side, i: int) -> Any:
            request = job_service_pb2.CreateJobRequest(job=job, job_id=client_ids[i])
            answer = await _answer(side.stub.CreateJob(request))
            if isinstance(answer, job_service_pb2.CreateJobResponse):
                side.tokens.add(answer.callback_token)
                if i == 0:
                    embedded_id.append(answer.job.id)
                elif not client_ids[i] and embedded_id:
                    side.ids[answer.job.id] = embedded_id[0]  # runs after the embedded one
            return answer

        emb, mon = await self.both(f"CreateJob id={client_ids[0]!r} kind={kind}", run)
        if isinstance(emb, job_service_pb2.CreateJobResponse):
            assert isinstance(mon, job_service_pb2.CreateJobResponse)
            self.jobs.append(
                LogicalJob((emb.job.id, mon.job.id), (emb.callback_token, mon.callback_token), kind)
            )

    def event(self, job: LogicalJob | None) -> tuple[dict[str, Any], str]:
        """A report's fields, without the id and token (they depend on the side)."""
        rng = self.rng
        fields: dict[str, Any] = {"idempotency_key": self.key(job) if rng.random() > 0.03 else ""}
        r = rng.random()
        if r < 0.78:
            percent = rng.uniform(0, 100)
            if rng.random() < 0.15:
                percent = rng.choice([0.0, 100.0, 100.0001, -0.5, math.nan, math.inf])
            progress = job_pb2.Progress(percent=percent, phase=self.odd(), message=self.odd())
            if rng.random() < 0.3:
                progress.media_time.FromSeconds(rng.randrange(1000))
                progress.media_duration.FromSeconds(1000)
            fields["progress"] = progress
            what = f"progress {percent:.1f}"
        elif r < 0.87:
            result = job_pb2.Result(output_key=self.odd(), message=self.odd())
            if rng.random() < 0.3:
                result.metadata.update({"n": 1.5, "s": self.odd(), "l": [1, "a", None]})
            if rng.random() < 0.2:
                result.artifacts.add(name="out.txt", size_bytes=3, sha256="ab")
            fields["completed"] = result
            what = "completed"
        elif r < 0.97:
            error = job_pb2.JobError(code=self.odd()[:20], message=self.odd())
            if rng.random() < 0.3:
                error.details.update({"why": self.odd()})
            fields["failed"] = error
            what = "failed"
        else:
            what = "no payload"
        if rng.random() < 0.2:
            when = rng.choice([1_700_000_000, 1_800_000_000, -5, 10**11])
            fields["event_time"] = Timestamp(seconds=when)
        if rng.random() < 0.15:
            fields["process_id"] = self.odd()[:300]
        if rng.random() < 0.04:
            fields["idempotency_key"] = "k" * 257  # too long
        return fields, what

    def report_plan(
        self, job: LogicalJob | None = None
    ) -> tuple[LogicalJob, dict[str, Any], str, TokenOf]:
        """A report to `job`, a known job, or (sometimes) a new id with create_kind."""
        if job is None and self.rng.random() < 0.12:
            new_id = f"aurora-{self.n}-{self.rng.randrange(1000)}"
            job = LogicalJob((new_id, new_id), ("", ""), self.rng.choice(KINDS))
            fields, what = self.event(job)
            fields["create_kind"] = job.kind
            return job, fields, f"{what} create_kind={job.kind}", lambda j, s: ""
        job = job or self.pick()
        fields, what = self.event(job)
        return job, fields, what, self.token()

    def note_created(self, job: LogicalJob, fields: dict[str, Any], ok: bool) -> None:
        if ok and fields.get("create_kind") and not any(j.ids == job.ids for j in self.jobs):
            self.jobs.append(job)

    async def burst(self) -> None:
        """Many reports to one job in a row: long histories that overflow the ring;
        or a worker's life: progress, then perhaps a cancel and its retries."""
        job = self.pick()
        if self.rng.random() < 0.5:
            for _ in range(self.rng.randint(4, 2 * RETENTION)):
                await self.report(job)
            return
        for _ in range(self.rng.randint(RETENTION - 2, RETENTION + 2)):
            fields = {"idempotency_key": self.key(job), "progress": job_pb2.Progress(percent=5)}
            await self.send(job, fields, "progress")
        if self.rng.random() < 0.5:
            await self.cancel(job)

    async def send(self, job: LogicalJob, fields: dict[str, Any], what: str) -> None:
        async def run(side: Side, i: int) -> Any:
            request = job_service_pb2.ReportEventRequest(job_id=job.ids[i], **fields)
            answer = await _answer(side.stub.ReportEvent(request))
            await _lapsed_again(side, [job.ids[i]])
            return answer

        await self.both(f"ReportEvent {job.ids[0]} {what} {fields['idempotency_key']}", run)

    async def report(self, to: LogicalJob | None = None) -> None:
        job, fields, what, token = self.report_plan(to)

        async def run(side: Side, i: int) -> Any:
            request = job_service_pb2.ReportEventRequest(
                job_id=job.ids[i], callback_token=token(job, i), **fields
            )
            answer = await _answer(side.stub.ReportEvent(request))
            await _lapsed_again(side, [job.ids[i]])
            return answer

        emb, _ = await self.both(
            f"ReportEvent {job.ids[0]} {what} {fields['idempotency_key']}", run
        )
        self.note_created(job, fields, isinstance(emb, job_service_pb2.ReportEventResponse))

    async def batch(self) -> None:
        if self.rng.random() < 0.15:  # one job's many events in one commit
            job = self.pick()
            plans = [self.report_plan(job) for _ in range(self.rng.randint(RETENTION, 20))]
        else:
            plans = [self.report_plan() for _ in range(self.rng.randint(1, 6))]
        if self.rng.random() < 0.2:
            plans.append(plans[0])  # the same event twice in one commit

        async def run(side: Side, i: int) -> Any:
            requests = [
                job_service_pb2.ReportEventRequest(
                    job_id=job.ids[i], callback_token=token(job, i), **fields
                )
                for job, fields, _, token in plans
            ]
            answer = await _answer(
                side.stub.BatchReportEvents(
                    job_service_pb2.BatchReportEventsRequest(requests=requests)
                )
            )
            await _lapsed_again(side, [r.job_id for r in requests])
            return answer

        what = "; ".join(f"{j.ids[0]} {w} {f['idempotency_key']}" for j, f, w, _ in plans)
        emb, _ = await self.both(f"BatchReportEvents [{what}]", run)
        if isinstance(emb, job_service_pb2.BatchReportEventsResponse):
            for (job, fields, _, _), result in zip(plans, emb.results, strict=True):
                self.note_created(job, fields, result.code == 0)

    async def claim(self) -> None:
        kind = self.rng.choice(KINDS)
        lease = self.rng.choice(["lapse", "long", "default"])
        worker = self.odd()[:100]

        async def run(side: Side, _: int) -> Any:
            request = job_service_pb2.ClaimJobRequest(kind=kind, worker_id=worker)
            if lease == "lapse":
                request.lease_duration.FromMilliseconds(1)
            elif lease == "long":
                request.lease_duration.FromSeconds(3600)
            answer = await _answer(side.stub.ClaimJob(request))
            claimed = isinstance(answer, job_service_pb2.ClaimJobResponse) and answer.job.id
            if lease == "lapse" and claimed:
                # The sweep requeues (or fails) it: wait, so that both runs see the
                # lapse before the next operation.
                await _until_not_running(side, answer.job.id)
            return answer

        await self.both(f"ClaimJob kind={kind} lease={lease}", run)

    async def cancel(self, to: LogicalJob | None = None) -> None:
        job, reason = to or self.pick(), self.odd()

        async def run(side: Side, i: int) -> Any:
            request = job_service_pb2.CancelJobRequest(id=job.ids[i], reason=reason)
            return await _answer(side.stub.CancelJob(request))

        await self.both(f"CancelJob {job.ids[0]}", run)
        if job.keys and self.rng.random() < 0.5:
            await self.retry(job)

    async def retry(self, job: LogicalJob) -> None:
        """A worker retrying its earlier reports, oldest first (say, after a timeout)."""
        for key in job.keys[-RETENTION - 2 : -RETENTION + 2]:
            await self.send(job, {"idempotency_key": key, "progress": job_pb2.Progress()}, "retry")

    async def get(self) -> None:
        job, token = self.pick(), self.token()

        async def run(side: Side, i: int) -> Any:
            request = job_service_pb2.GetJobRequest(id=job.ids[i], callback_token=token(job, i))
            return await _answer(side.stub.GetJob(request))

        await self.both(f"GetJob {job.ids[0]}", run)

    async def list_jobs(self) -> None:
        rng = self.rng
        states = rng.sample(STATES, rng.randint(1, 2)) if rng.random() < 0.5 else []
        kind: Any = rng.choice(KINDS) if rng.random() < 0.4 else 0
        labels = self.labels(2) if rng.random() < 0.5 else {}
        page_size = rng.choice([0, 1, 2, 3, 7, 1001])
        newest_first = rng.random() < 0.5

        async def run(side: Side, _: int) -> Any:
            pages: list[Any] = []
            token = ""
            for _ in range(200):
                request = job_service_pb2.ListJobsRequest(
                    page_size=page_size,
                    page_token=token,
                    states=states,
                    kind=kind,
                    labels=labels,
                    newest_first=newest_first,
                )
                answer = await _answer(side.stub.ListJobs(request))
                if not isinstance(answer, job_service_pb2.ListJobsResponse):
                    return [*pages, answer]
                token = answer.next_page_token
                # Only whether there is a next page is compared (see the module doc).
                pages.append([*answer.jobs, f"more={bool(token)}"])
                if not token:
                    break
            return pages

        what = f"states={states} kind={kind} labels={labels} n={page_size} newest={newest_first}"
        await self.both(f"ListJobs {what}", run)

    async def write_log(self) -> None:
        rng = self.rng
        job, token = self.pick(), self.token()
        unknown = rng.random() < 0.15  # no job id: "UNKNOWN"
        level = rng.choice([*LEVELS, 0, 9] if rng.random() < 0.05 else LEVELS)
        message = self.odd() or "line"
        # A given time (before the service's clock) or none (the service's clock).
        seconds = rng.choice([0, 0, 1_700_000_000, 1_700_000_001, 1_750_000_000])

        async def run(side: Side, i: int) -> Any:
            entry = log_pb2.LogEntry(
                job_id="" if unknown else job.ids[i], level=level, message=message
            )
            if seconds:
                entry.time.FromSeconds(seconds)
            request = job_service_pb2.WriteLogRequest(entry=entry, callback_token=token(job, i))
            return await _answer(side.stub.WriteLog(request))

        await self.both(f"WriteLog {'' if unknown else job.ids[0]} level={level}", run)

    async def list_logs(self) -> None:
        rng = self.rng
        job = self.pick() if rng.random() < 0.7 else LogicalJob(("", ""), ("", ""), 0)
        level = rng.choice([0, 0, *LEVELS])
        limit = rng.choice([0, 1, 3, 10])
        token = self.token() if job.ids[0] else (lambda j, s: "")

        async def run(side: Side, i: int) -> Any:
            request = job_service_pb2.ListLogsRequest(
                job_id=job.ids[i], level=level, limit=limit, callback_token=token(job, i)
            )
            return await _answer(side.stub.ListLogs(request))

        await self.both(f"ListLogs {job.ids[0]} level={level} limit={limit}", run)

    async def upload(self) -> None:
        rng = self.rng
        job, token = self.pick(), self.token()
        names = [*ARTIFACT_NAMES, "bad/name", ""] if rng.random() < 0.1 else ARTIFACT_NAMES
        name = rng.choice(names)
        size = rng.choice([0, 1, 100, 5000]) if rng.random() < 0.95 else 2**20 * 5 // 2
        content = rng.randbytes(size)
        step = rng.choice([1500, 2**20 - 1, 2**20 + 7])  # chunk edges unlike the store's
        parts = [content[i : i + step] for i in range(0, len(content), step)]
        content_type = rng.choice(["", "text/plain", "application/zip"])
        broken = rng.random() < 0.1  # a second header mid-stream: nothing is stored

        async def run(side: Side, i: int) -> Any:
            header = job_service_pb2.ArtifactHeader(
                job_id=job.ids[i],
                name=name,
                content_type=content_type,
                callback_token=token(job, i),
            )

            async def stream() -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
                yield job_service_pb2.UploadArtifactRequest(header=header)
                for part in parts:
                    yield job_service_pb2.UploadArtifactRequest(data=part)
                if broken:
                    yield job_service_pb2.UploadArtifactRequest(header=header)

            for _ in range(5):
                answer = await _answer(side.stub.UploadArtifact(stream()))
                # grpcio's asyncio client reports a refusal that arrives while it still
                # writes as INTERNAL "Internal error from Core" instead of the service's
                # status (grpc/grpc#36066), now and then on either store. A refused
                # upload stores nothing, so the same upload again is safe.
                if answer != "ERROR INTERNAL: Internal error from Core":
                    break
            return answer

        emb, _ = await self.both(f"UploadArtifact {job.ids[0]}/{name} broken={broken}", run)
        if not isinstance(emb, str):
            self.uploaded.append((job, name))

    async def read_artifact(self) -> None:
        if self.uploaded and self.rng.random() < 0.7:
            job, name = self.rng.choice(self.uploaded)
        else:
            job, name = self.pick(), self.rng.choice([*ARTIFACT_NAMES, "missing.bin"])

        async def run(side: Side, i: int) -> Any:
            request = job_service_pb2.ReadArtifactRequest(job_id=job.ids[i], name=name)
            try:
                parts = [p async for p in side.stub.ReadArtifact(request, timeout=STREAM_WAIT)]
            except grpc.aio.AioRpcError as err:
                return f"ERROR {err.code().name}: {err.details()}"
            data = b"".join(p.data for p in parts if p.WhichOneof("part") == "data")
            return [p for p in parts if p.WhichOneof("part") != "data"] + [data.hex()]

        await self.both(f"ReadArtifact {job.ids[0]}/{name}", run)

    async def list_artifacts(self) -> None:
        job = self.pick()

        async def run(side: Side, i: int) -> Any:
            request = job_service_pb2.ListArtifactsRequest(job_id=job.ids[i])
            return await _answer(side.stub.ListArtifacts(request))

        await self.both(f"ListArtifacts {job.ids[0]}", run)

    def from_sequence(self) -> int:
        return self.rng.choice([0, 0, 1, 2, 5, 9, 15, 30, -1])

    async def list_events(self) -> None:
        job, after, token = self.pick(), self.from_sequence(), self.token()

        async def run(side: Side, i: int) -> Any:
            request = job_service_pb2.ListJobEventsRequest(
                job_id=job.ids[i], from_sequence=after, callback_token=token(job, i)
            )
            return await _answer(side.stub.ListJobEvents(request))

        await self.both(f"ListJobEvents {job.ids[0]} after={after}", run)

    async def watch(self) -> None:
        job, after = self.pick(), self.from_sequence()

        async def run(side: Side, i: int) -> Any:
            request = job_service_pb2.WatchJobRequest(id=job.ids[i], from_sequence=after)
            return await _watch(side, request)

        await self.both(f"WatchJob {job.ids[0]} from={after}", run)


TERMINAL = (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED)


@contextlib.contextmanager
def _ends_into(call: Any, items: list[Any]) -> Iterator[None]:
    """How a stream read ends, as the last of `items` (an error, a timeout); the call is
    cancelled either way."""
    try:
        yield
    except grpc.aio.AioRpcError as err:
        items.append(f"ERROR {err.code().name}: {err.details()}")
    except TimeoutError:
        items.append("timeout")
    finally:
        call.cancel()


async def _watch(side: Side, request: job_service_pb2.WatchJobRequest) -> list[Any]:
    """What a WatchJob stream sends before it would wait for live events: the snapshot,
    a gap, the replay; to its end for a terminal job (nothing else happens meanwhile:
    live events could only come from the next operations)."""
    call = side.stub.WatchJob(request)
    items: list[Any] = []
    newest, terminal = 0, False
    with _ends_into(call, items):
        while True:
            item = await asyncio.wait_for(call.read(), STREAM_WAIT)
            if item is grpc.aio.EOF:
                items.append("end")
                break
            which = item.WhichOneof("item")
            items.append(getattr(item, which))
            if which == "snapshot":
                newest, terminal = item.snapshot.sequence, item.snapshot.state in TERMINAL
                reached = request.from_sequence
            elif which == "event":
                reached = item.event.sequence
            else:
                continue
            if not terminal and reached >= newest:
                items.append("caught up")
                break
    return items


async def _firehose(side: Side, _: int) -> list[Any]:
    """The whole firehose log replayed (WatchJobs after=0), as many events as the jobs'
    sequence numbers add up to; positions are opaque and per store (compared: set)."""
    listed = await side.stub.ListJobs(job_service_pb2.ListJobsRequest(page_size=1000))
    expected = sum(job.sequence for job in listed.jobs)
    call = side.stub.WatchJobs(job_service_pb2.WatchJobsRequest(after="0"))
    items: list[Any] = []
    with _ends_into(call, items):
        while len(items) < expected:
            item = await asyncio.wait_for(call.read(), STREAM_WAIT)
            if item is grpc.aio.EOF:
                items.append("end")
                break
            item.send_time.Clear()
            item.position = "<position>" if item.position else ""
            items.append(item)
    return items


async def _lapsed_again(side: Side, job_ids: list[str]) -> None:
    """A report on a job whose 1 ms claim lapsed takes the claim back for 1 ms more
    (6061c23): it lapses again when a sweep's timer fires, earlier in one run than
    in the other. Wait for that sweep, as the lapsing claim itself does."""
    for job_id in dict.fromkeys(job_ids):
        got = await _answer(side.stub.GetJob(job_service_pb2.GetJobRequest(id=job_id)))
        lapsing = isinstance(got, job_pb2.Job) and got.state == job_pb2.JOB_STATE_RUNNING
        if lapsing and got.HasField("lease_duration") and got.lease_duration.ToMilliseconds() <= 1:
            await _until_not_running(side, job_id)


async def _until_not_running(side: Side, job_id: str) -> None:
    await _until(side, job_id, lambda job: job.state != job_pb2.JOB_STATE_RUNNING, "swept")


async def _until(side: Side, job_id: str, done: Callable[[job_pb2.Job], bool], what: str) -> None:
    """Polls the job until a sweep of the service has done what `done` checks."""
    deadline = time.monotonic() + STREAM_WAIT
    while time.monotonic() < deadline:
        job = await side.stub.GetJob(job_service_pb2.GetJobRequest(id=job_id))
        if done(job):
            return
        await asyncio.sleep(0.02)  # the polling interval of this waiter
    raise AssertionError(f"{side.name}: {job_id} was not {what} in time")


def _policy(retention: int) -> Policy:
    return Policy(retention=retention, lease_ns=60 * 10**9, max_attempts=2)


@pytest.fixture
async def sides(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Side, Side]]:
    """The same service twice: over the embedded store, and over MongoDB (FerretDB)."""
    uri = request.getfixturevalue("mongo_uri")
    database = f"diff_{os.urandom(6).hex()}"

    async def embedded(retention: int = RETENTION) -> ServiceHandle:
        return await _start(EmbeddedStore(tmp_path / "data", _policy(retention)))

    async def mongo(retention: int = RETENTION) -> ServiceHandle:
        return await _start(MongoStore(uri, policy=_policy(retention), database=database))

    made: list[Side] = []
    try:
        made.append(Side("embedded", await embedded(), embedded))
        made.append(Side("mongo", await mongo(), mongo))
        yield made[0], made[1]
    finally:
        for side in made:
            await side.handle.close()


async def _start(store: EmbeddedStore | MongoStore) -> ServiceHandle:
    retention = store.policy.retention
    handle = await start_service(store, lease_sweep_seconds=0.02, event_retention=retention)
    handle.running.jobs.stall_sweep_seconds = 0.02  # Fuzz.stall waits for its sweeps
    return handle


async def test_both_stores_answer_the_same(sides: tuple[Side, Side]) -> None:
    print(f"differential seed {SEED} ({CASES} operations); JOBWIRE_FUZZ_SEED={SEED} reproduces")
    fuzz = Fuzz(random.Random(SEED), sides)
    started = time.monotonic()
    for _ in range(CASES):
        await fuzz.step()
    # Then every job read back whole: its snapshot and retained events.
    for job in fuzz.jobs:

        async def run(side: Side, i: int, job: LogicalJob = job) -> Any:
            request = job_service_pb2.ListJobEventsRequest(job_id=job.ids[i])
            return [
                await _answer(side.stub.GetJob(job_service_pb2.GetJobRequest(id=job.ids[i]))),
                await _answer(side.stub.ListJobEvents(request)),
            ]

        await fuzz.both(f"final {job.ids[0]}", run)
    replayed, _ = await fuzz.both("WatchJobs after=0", _firehose)
    assert all(not isinstance(item, str) for item in replayed), replayed[-1]
    print("answers:", dict(sorted(fuzz.seen.items())))
    print(
        f"{CASES} operations over {len(fuzz.jobs)} jobs ({len(replayed)} events),"
        " the same on both stores"
        f" ({time.monotonic() - started:.1f} s)"
    )
