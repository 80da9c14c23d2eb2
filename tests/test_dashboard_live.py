"""The dashboard's hub (dashboard/live.py) against the real service: a jobs page's
mark, taken before its rows are read, brings its stream what changed in between."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import orjson
import pytest

from dashboard.live import Hub, Subscriber
from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from service.store.embedded import EmbeddedStore
from tests.conftest import ServiceHandle, make_policy, start_service
from tests.grpc_proxy import FaultProxy
from tests.helpers import free_port

WAIT = 10.0


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[ServiceHandle]:
    handle = await start_service(EmbeddedStore(tmp_path, make_policy()))
    yield handle
    await handle.close()


async def _first_event(svc: ServiceHandle, percent: float = 5) -> str:
    """A new job and its first event (what makes it appear on a jobs page)."""
    job_id = f"j-{uuid.uuid4().hex[:8]}"
    job = job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC)
    await svc.stub.CreateJob(job_service_pb2.CreateJobRequest(job=job, job_id=job_id))
    await _progress(svc, job_id, percent)
    return job_id


async def _progress(svc: ServiceHandle, job_id: str, percent: float) -> None:
    await svc.stub.ReportEvent(
        job_service_pb2.ReportEventRequest(
            job_id=job_id,
            idempotency_key=uuid.uuid4().hex,
            progress=job_pb2.Progress(percent=percent, phase="p", message="first"),
        )
    )


async def _until_seen(witness: Subscriber, job_id: str, sequence: int) -> None:
    """Waits until the hub has dispatched `job_id`'s event `sequence` (to `witness`,
    a stream that follows every job)."""

    async def seen() -> None:
        while True:
            change = witness.pending.get(job_id)
            if change is not None and change.event.sequence >= sequence:
                return
            await witness.wake.wait()
            witness.wake.clear()

    await asyncio.wait_for(seen(), WAIT)


async def test_a_stream_gets_what_changed_between_its_mark_and_its_subscription(
    svc: ServiceHandle,
) -> None:
    """The window a jobs page has between reading its rows and opening its stream: a
    new job's first event, and a later event of a row it shows, both land in it."""
    hub = Hub(lambda: svc.stub)
    try:
        shown = await _first_event(svc)  # on the page when its rows are read
        mark = await asyncio.wait_for(hub.mark(), WAIT)  # started the stream: it is live
        assert mark
        witness = hub.subscribe()
        appeared = await _first_event(svc)
        await _progress(svc, shown, 60)
        await _until_seen(witness, appeared, 1)
        await _until_seen(witness, shown, 2)

        tab = hub.subscribe(ids={shown}, since=mark)
        changes, fresh = tab.take()
        got = {c.event.job_id: c.event.sequence for c in changes}
        assert got == {shown: 2, appeared: 1}
        assert fresh == {appeared}  # the page adds it as a new row
        assert not tab.resync

        late = hub.subscribe(ids={shown}, since=None)  # no mark: live from now only
        assert late.take() == ([], set())
        again = hub.subscribe(ids={shown}, since=await hub.mark())  # nothing since
        assert again.take() == ([], set()) and not again.resync
    finally:
        await hub.close()


async def test_a_deletion_reaches_the_tabs_from_the_stream_and_the_journal(
    svc: ServiceHandle,
) -> None:
    """A job deleted by another client: the tabs that show it hear it from the hub's
    WatchJobs stream (no GetJob), a tab of another kind does not, and a tab whose mark
    was taken before the deletion hears it from the journal when it subscribes; a job
    made again under the id is new to them."""
    hub = Hub(lambda: svc.stub)
    try:
        job_id = await _first_event(svc)
        await svc.stub.CancelJob(job_service_pb2.CancelJobRequest(id=job_id))
        mark = await asyncio.wait_for(hub.mark(), WAIT)
        showing = hub.subscribe(ids={job_id})
        videos = hub.subscribe(kind=job_pb2.JOB_KIND_VIDEO)
        await svc.stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=job_id))
        await asyncio.wait_for(showing.wake.wait(), WAIT)
        assert showing.take_gone() == {job_id}
        assert videos.take_gone() == set()

        late = hub.subscribe(ids={job_id}, since=mark)  # its rows read before the deletion
        assert late.take_gone() == {job_id} and not late.resync

        await svc.stub.CreateJob(
            job_service_pb2.CreateJobRequest(
                job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC), job_id=job_id
            )
        )
        await _progress(svc, job_id, 7)
        await _until_seen(showing, job_id, 1)
        changes, fresh = showing.take()
        assert [c.event.job_id for c in changes] == [job_id] and fresh == {job_id}
    finally:
        await hub.close()


async def test_a_deletion_missed_while_the_stream_was_down_is_replayed(
    svc: ServiceHandle,
) -> None:
    """The hub's WatchJobs stream breaks as a job is deleted (and made again under its
    id at once): the stream resumes from its last position and the service replays the
    deletion, so the tab hears it. A GetJob poll finds the new job and says nothing."""
    proxy = await FaultProxy(svc.target).start()
    channel = grpc.aio.insecure_channel(proxy.target)
    stub = job_service_pb2_grpc.JobServiceStub(channel)
    hub = Hub(lambda: stub)
    try:
        job_id = await _first_event(svc)
        await svc.stub.CancelJob(job_service_pb2.CancelJobRequest(id=job_id))
        # Its first message (the deletion) is lost with the stream.
        proxy.abort_next_stream("WatchJobs", 0, grpc.StatusCode.UNAVAILABLE)
        assert await asyncio.wait_for(hub.mark(), WAIT)
        tab = hub.subscribe(ids={job_id})
        await svc.stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=job_id))
        await svc.stub.CreateJob(
            job_service_pb2.CreateJobRequest(
                job=job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC), job_id=job_id
            )
        )

        async def heard() -> None:
            while job_id not in tab.gone:
                await tab.wake.wait()
                tab.wake.clear()

        await asyncio.wait_for(heard(), WAIT)
        assert proxy.calls["WatchJobs"] >= 2  # it was resumed
    finally:
        await hub.close()
        await channel.close()
        await proxy.close()


async def test_a_mark_the_journal_does_not_cover_gets_a_resync(svc: ServiceHandle) -> None:
    """Too much happened since the mark (the journal let it go), or the mark is from
    another run of the hub or is not a mark at all: the tab re-reads its rows rather
    than miss anything."""
    hub = Hub(lambda: svc.stub, journal=4)
    try:
        mark = await asyncio.wait_for(hub.mark(), WAIT)
        witness = hub.subscribe()
        jobs = [await _first_event(svc) for _ in range(5)]
        for job_id in jobs:
            await _until_seen(witness, job_id, 1)
        instance, epoch, counter = mark.split(".")
        for stale in (
            mark,  # five changes since, four kept
            f"{'0' * 8}.{epoch}.{counter}",  # another dashboard process
            f"{instance}.{int(epoch) + 1}.{counter}",  # another start of the stream
            f"{instance}.{epoch}.99",  # ahead of what the hub saw
            "",  # the page had no mark (the stream was not live when it loaded)
            "junk",
        ):
            tab = hub.subscribe(ids=set(), since=stale)
            assert tab.resync and tab.wake.is_set(), stale
            assert tab.take() == ([], set()), stale
        covered = hub.subscribe(ids=set(), since=f"{instance}.{epoch}.{int(counter) + 1}")
        changes, fresh = covered.take()
        assert [c.event.job_id for c in changes] == jobs[1:] and fresh == set(jobs[1:])
        assert not covered.resync
    finally:
        await hub.close()


async def until_live(hub: Hub, tab: Subscriber) -> None:
    """Until the hub's stream is live and the service answered its check (ListJobs):
    each step wakes the tab to re-read its rows, the second one after the first, so a
    wait that ended at `live` alone took the second wake for the next event's."""
    while not (hub.live and hub.connected):
        await tab.wake.wait()
        if not (hub.live and hub.connected):
            tab.wake.clear()


async def test_a_page_load_does_not_wait_for_a_service_that_is_down(tmp_path: Path) -> None:
    """No service: the mark is "" as soon as the attempt fails, not after the whole
    wait; the tab is told to re-read its rows once the stream is live, not before (a
    re-read before then would have the same window)."""
    port = free_port()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = job_service_pb2_grpc.JobServiceStub(channel)
    hub = Hub(lambda: stub)
    svc: ServiceHandle | None = None
    try:
        start = time.monotonic()
        assert await hub.mark(wait=WAIT) == ""
        assert time.monotonic() - start < WAIT / 2
        tab = hub.subscribe(ids=set(), since="")
        assert tab.resync and not tab.wake.is_set()
        svc = await start_service(
            EmbeddedStore(tmp_path, make_policy()), grpc_addr=f"127.0.0.1:{port}"
        )
        # (Its failed attempts wake the tab too, to say the service is down.)
        await asyncio.wait_for(until_live(hub, tab), WAIT)
        assert tab.resync and tab.wake.is_set()  # re-read now: it is live
        tab.take()
        tab.resync = False
        job_id = await _first_event(svc)  # right after: it reaches the tab
        await asyncio.wait_for(tab.wake.wait(), WAIT)
        assert [c.event.job_id for c in tab.take()[0]] == [job_id]
    finally:
        await hub.close()
        await channel.close()
        if svc is not None:
            await svc.close()


async def test_a_row_changes_only_what_its_event_changes(svc: ServiceHandle) -> None:
    """A finished job's row (`/events/jobs`) blanked its phase and message (a completion
    without a message), which a reload showed again: a row now carries `percent`,
    `phase` and `message` only when its event changes them. Its JSON is made once."""
    hub = Hub(lambda: svc.stub)
    try:
        await asyncio.wait_for(hub.mark(), WAIT)
        witness = hub.subscribe()
        done, cancelled = await _first_event(svc), await _first_event(svc)
        await _until_seen(witness, cancelled, 1)
        first = orjson.loads(witness.pending[done].json())
        assert (first["phase"], first["message"]) == ("p", "first")
        await svc.stub.ReportEvent(
            job_service_pb2.ReportEventRequest(
                job_id=done, idempotency_key="end", completed=job_pb2.Result()
            )
        )
        await svc.stub.CancelJob(job_service_pb2.CancelJobRequest(id=cancelled))
        await _until_seen(witness, done, 2)
        await _until_seen(witness, cancelled, 2)
        ended = orjson.loads(witness.pending[done].json())
        assert ended["percent"] == 100.0 and "phase" not in ended and "message" not in ended
        assert "phase" not in orjson.loads(witness.pending[cancelled].json())
        change = witness.pending[done]
        assert change.json() is change.json()  # one serialisation, shared by the tabs
    finally:
        await hub.close()


async def test_a_row_that_left_a_state_filtered_page_comes_back_when_it_enters_it_again(
    tmp_path: Path,
) -> None:
    """A RUNNING page's row whose job was requeued (its lease expired) left the page,
    but the tab went on following the job, so its claim again was a change of a row the
    page no longer had: it never came back until a reload. The job is no longer
    followed once outside the page's states: its claim gets the tab a resync."""
    svc = await start_service(EmbeddedStore(tmp_path, make_policy()), lease_sweep_seconds=0.05)
    hub = Hub(lambda: svc.stub)
    try:
        job = job_pb2.Job(kind=job_pb2.JOB_KIND_GENERIC)
        job_id = (await svc.stub.CreateJob(job_service_pb2.CreateJobRequest(job=job))).job.id
        claim = job_service_pb2.ClaimJobRequest(kind=job_pb2.JOB_KIND_GENERIC, worker_id="w")
        claim.lease_duration.FromMilliseconds(200)
        assert (await svc.stub.ClaimJob(claim)).job.id == job_id
        await asyncio.wait_for(hub.mark(), WAIT)
        witness = hub.subscribe()
        tab = hub.subscribe(ids={job_id}, states=frozenset({job_pb2.JOB_STATE_RUNNING}))
        await _until_seen(witness, job_id, 2)  # REQUEUED: the lease expired
        changes, _ = tab.take()  # the row's last change: the page drops the row
        assert [(c.event.job_id, c.event.state) for c in changes] == [
            (job_id, job_pb2.JOB_STATE_QUEUED)
        ]
        assert not tab.resync
        claim.lease_duration.FromSeconds(60)
        assert (await svc.stub.ClaimJob(claim)).job.id == job_id
        await _until_seen(witness, job_id, 3)
        assert tab.resync  # the page re-reads its rows, and shows the job again
    finally:
        await hub.close()
        await svc.close()
