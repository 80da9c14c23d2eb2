"""Concurrent video-worker callbacks that retry like a worker, and the exactly-once check.

Each worker owns one video job and sends progress reports `"<job>-<n>"` one after the
other. A report is retried with the very same bytes (so the same idempotency key)
after a 503, a 5xx, a timeout or a broken connection, until it gets a 2xx or the run
ends; only a 2xx counts as acknowledged. Afterwards the job's events are read over
gRPC: an acknowledged report missing there is lost; a report stored twice is a
duplicate.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import grpc
import orjson

from jobwire.v1 import job_service_pb2 as svc
from jobwire.v1 import job_service_pb2_grpc

from .procs import API_KEY

RETRY_PAUSE = 0.2


@dataclass
class Tally:
    acked: dict[str, set[str]] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    unavailable: int = 0  # 503 answers
    unavailable_without_retry_after: int = 0
    unresolved: int = 0  # reports still unanswered when the run ended (not acknowledged)
    fault_start: float | None = None
    fault_end: float | None = None
    first_ok_after_fault: float | None = None
    slowest_answer_in_fault: float = 0.0  # seconds, any HTTP answer while the fault lasted
    answers_in_fault: int = 0

    @property
    def acknowledged(self) -> int:
        return sum(len(v) for v in self.acked.values())

    @property
    def recovery_seconds(self) -> float | None:
        if self.fault_end is None or self.first_ok_after_fault is None:
            return None
        return max(0.0, self.first_ok_after_fault - self.fault_end)


class Load:
    def __init__(
        self, url: str, jobs: list[str], clients: int = 4, client_timeout: float = 20.0
    ) -> None:
        self.url = f"{url}/api/report"
        self.jobs = jobs
        self.clients = clients
        self.client_timeout = client_timeout
        self.tally = Tally(acked={job: set() for job in jobs})
        self._stop = asyncio.Event()
        self._hard_stop = 0.0

    def stop(self, drain_seconds: float) -> None:
        """No new reports from now on; reports being retried get `drain_seconds` more."""
        self._hard_stop = time.monotonic() + drain_seconds
        self._stop.set()

    async def run(self) -> None:
        sessions = [aiohttp.ClientSession() for _ in range(self.clients)]
        try:
            await asyncio.gather(
                *(self._worker(sessions[i % self.clients], job) for i, job in enumerate(self.jobs))
            )
        finally:
            for s in sessions:
                await s.close()

    async def _worker(self, http: aiohttp.ClientSession, job: str) -> None:
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=self.client_timeout)
        tally = self.tally
        n = 0
        while not self._stop.is_set():
            message = f"{job}-{n}"
            body = orjson.dumps(
                {"status": "progress", "message": message, "videoId": job, "percent": n % 100}
            )
            while True:
                sent = time.monotonic()
                status: int | None = None
                try:
                    async with http.post(
                        self.url, data=body, headers=headers, timeout=timeout
                    ) as r:
                        status = r.status
                        retry_after = r.headers.get("Retry-After")
                        await r.read()
                except (aiohttp.ClientError, TimeoutError, OSError):
                    pass
                answered = time.monotonic()
                tally.statuses[str(status) if status else "no answer"] += 1
                in_fault = tally.fault_start is not None and tally.fault_end is None
                if status is not None and in_fault and sent >= (tally.fault_start or 0):
                    tally.answers_in_fault += 1
                    tally.slowest_answer_in_fault = max(
                        tally.slowest_answer_in_fault, answered - sent
                    )
                if status == 503:
                    tally.unavailable += 1
                    if not retry_after:
                        tally.unavailable_without_retry_after += 1
                if status is not None and 200 <= status < 300:
                    tally.acked[job].add(message)
                    end = tally.fault_end
                    if end is not None and sent >= end and tally.first_ok_after_fault is None:
                        tally.first_ok_after_fault = answered
                    break
                if status is not None and status < 500 and status not in (408, 429):
                    break  # refused for good (a bug in this load, or the bridge's)
                if self._stop.is_set() and time.monotonic() > self._hard_stop:
                    tally.unresolved += 1
                    return
                await asyncio.sleep(RETRY_PAUSE)  # a worker's back-off before its retry
            n += 1


async def create_jobs(target: str, jobs: list[str]) -> None:
    from jobwire.v1 import job_pb2

    async with grpc.aio.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        for job in jobs:
            video = job_pb2.Video(url=f"https://example.test/{job}.mp4")
            await stub.CreateJob(
                svc.CreateJobRequest(job=job_pb2.Job(kind=job_pb2.JOB_KIND_VIDEO, video=video),
                                     job_id=job),
                timeout=30,
            )  # fmt: skip


@dataclass
class Verdict:
    stored: int
    lost: int
    duplicates: int


async def verify(target: str, acked: dict[str, set[str]]) -> Verdict:
    """Reads every job's events over gRPC and compares them with what was acknowledged."""
    stored = lost = duplicates = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        for job, messages in acked.items():
            reply = await stub.ListJobEvents(svc.ListJobEventsRequest(job_id=job), timeout=60)
            counts = Counter(e.progress.message for e in reply.events if e.HasField("progress"))
            stored += sum(counts.values())
            lost += len(messages - counts.keys())
            duplicates += sum(c - 1 for c in counts.values() if c > 1)
    return Verdict(stored, lost, duplicates)
