"""`jobwire watch`, `jobs` and `logs` on the client library: what watch prints for a
coalesced range, a gap and a stall, `jobs list --all`, `logs`, and TLS + token from the
environment. Real service and a real loopback proxy (to coalesce / mark a stall)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from jobwire.client import Client, Job, JobEvent
from jobwire.v1 import event_pb2, job_service_pb2
from service.store.embedded import EmbeddedStore
from tests.bridge_process import cli_bridge_process
from tests.conftest import ServiceHandle, make_policy, start_service
from tests.grpc_proxy import FaultProxy
from tests.helpers import cli_process, cli_result, free_port, progress
from tests.test_event_pages import BIG, big_history

WAIT = 20.0


def _coalesce_and_stall(message: bytes) -> bytes | None:
    reply = job_service_pb2.WatchJobResponse.FromString(message)
    if reply.WhichOneof("item") != "event":
        return message
    seq = reply.event.sequence
    if 5 <= seq < 9:
        return None
    if seq == 9:
        reply.event.coalesced_from_sequence = 5
    if seq == 3:  # stands in for the service's STALLED event
        reply.event.type = event_pb2.EVENT_TYPE_STALLED
    return reply.SerializeToString()


async def test_watch_prints_coalesced_ranges_stalls_and_gaps(tmp_path: Path) -> None:
    handle = await start_service(EmbeddedStore(tmp_path / "d", make_policy()), event_retention=16)
    proxy = await FaultProxy(handle.target).start()
    try:
        async with Client(handle.target) as c:
            await c.create_job("GENERIC", job_id="cw")
            for i in range(1, 12):
                await c.report_progress("cw", i * 5, message=f"step {i}")
            await c.complete("cw")
            proxy.rewrite["WatchJob"] = _coalesce_and_stall
            code, out, err = await cli_result("watch", "cw", "--target", proxy.target)
            assert code == 0, err
            assert "events 5–9 coalesced" in out
            assert "STALLED at event 3" in out
            assert "SUCCEEDED" in out and "100.0%" in out
            for i in range(12, 30):
                await c.create_job("GENERIC", job_id=f"g{i}")
            await c.create_job("GENERIC", job_id="gap")
            for i in range(1, 30):
                await c.report_progress("gap", i)
            await c.fail("gap", "E", "broken")
            code, out, err = await cli_result(
                "watch", "gap", "--from-sequence", "2", "--target", handle.target
            )
            assert code == 1, err  # ended, not SUCCEEDED
            assert "events 3–14 no longer retained (gap); resuming at 15" in out
            assert "FAILED" in out
            # Past the job's end (another database, a restored backup): said as such,
            # not as "events 41–30 no longer retained".
            code, out, err = await cli_result(
                "watch", "gap", "--from-sequence", "40", "--target", handle.target
            )
            assert code == 1, err
            assert "the job's history ends at event 30, before 40" in out, out
            assert "a starting sequence past its end" in out, out  # a typo, most likely
            assert "no longer retained" not in out
    finally:
        await proxy.close()
        await handle.close()


async def test_jobs_list_all_pages_and_logs(grpc_service: ServiceHandle) -> None:
    target = grpc_service.target
    async with Client(target) as c:
        for i in range(5):
            await c.create_job("TRANSCODE", job_id=f"pl-{i}", labels={"suite": "pages"})
        await c.write_log("hello", job_id="pl-0", level="WARNING")
    code, out, err = await cli_result(
        "jobs", "list", "--all", "--page-size", "2", "--label", "suite=pages", "--target", target
    )
    assert code == 0, err
    assert [j["id"] for j in json.loads(out)["jobs"]] == [f"pl-{i}" for i in range(5)]
    code, out, err = await cli_result(
        "jobs", "list", "--all", "--newest-first", "--page-size", "2", "--label", "suite=pages",
        "--target", target,
    )  # fmt: skip
    assert code == 0, err
    assert [j["id"] for j in json.loads(out)["jobs"]] == [f"pl-{i}" for i in (4, 3, 2, 1, 0)]
    code, out, _ = await cli_result(
        "jobs", "list", "--page-size", "2", "--label", "suite=pages", "--target", target
    )
    page = json.loads(out)
    assert len(page["jobs"]) == 2 and page["nextPageToken"]
    # --all with a token listed from the first page again, the token ignored unsaid.
    code, out, err = await cli_result(
        "jobs", "list", "--all", "--page-token", page["nextPageToken"], "--target", target
    )
    assert code == 2 and out == "", (out, err)
    assert "argument --page-token: not allowed with argument --all" in err, err
    code, out, err = await cli_result(
        "logs", "--job", "pl-0", "--level", "WARNING", "--target", target
    )
    assert code == 0, err
    assert [e["message"] for e in json.loads(out)["entries"]] == ["hello"]


async def test_cli_uses_tls_and_token_from_the_environment(tmp_path: Path) -> None:
    from tests.test_ops import _self_signed

    cert, key = _self_signed(tmp_path)
    handle = await start_service(
        EmbeddedStore(tmp_path / "d", make_policy()),
        grpc_tls_cert=str(cert),
        grpc_tls_key=str(key),
        grpc_token="s3cr3t",
    )
    env = {"JOBWIRE_SERVICE_TLS_CA": str(cert), "JOBWIRE_GRPC_TOKEN": "s3cr3t"}
    try:
        code, out, err = await cli_result(
            "jobs", "create", "--kind", "GENERIC", "--id", "t-1", "--target", handle.target, env=env
        )
        assert code == 0, err
        assert json.loads(out)["job"]["id"] == "t-1"
        code, _, err = await cli_result(
            "jobs", "get", "t-1", "--target", handle.target, env={**env, "JOBWIRE_GRPC_TOKEN": "no"}
        )
        assert code == 1 and "UNAUTHENTICATED" in err
        code, _, err = await cli_result(
            "jobs",
            "get",
            "t-1",
            "--target",
            handle.target,
            env={**env, "JOBWIRE_SERVICE_TLS_CA": str(tmp_path / "missing.pem")},
        )
        assert code != 0 and "cannot read" in err
    finally:
        await handle.close()


async def test_a_real_stall_is_watched_and_printed(tmp_path: Path) -> None:
    """The service's own STALLED event (progress deadline passed), through the library
    and through `jobwire watch`."""
    handle = await start_service(
        EmbeddedStore(tmp_path / "d", make_policy()), lease_sweep_seconds=0.05
    )
    try:
        async with Client(handle.target) as c:
            await c.create_job("GENERIC", job_id="st", progress_deadline=1.0)
            await c.report_progress("st", 10, message="started")
            watch = c.watch_job("st")
            types = []
            async for item in watch:
                if isinstance(item, Job):
                    continue
                assert isinstance(item, JobEvent)
                types.append(item.type)
                if item.type == event_pb2.EVENT_TYPE_STALLED:
                    assert (await c.get_job("st")).stalled
                    await c.report_progress("st", 60, message="alive again")
                elif item.sequence == 3:
                    assert not (await c.get_job("st")).stalled
                    await c.complete("st")
            assert types == [
                event_pb2.EVENT_TYPE_PROGRESS,
                event_pb2.EVENT_TYPE_STALLED,
                event_pb2.EVENT_TYPE_PROGRESS,
                event_pb2.EVENT_TYPE_COMPLETED,
            ]
        code, out, err = await cli_result("watch", "st", "--target", handle.target)
        assert code == 0, err
        assert "STALLED at event 2" in out and "SUCCEEDED" in out
    finally:
        await handle.close()


async def test_jobs_events_and_cancel(grpc_service: ServiceHandle) -> None:
    """`jobs events` prints a job's retained history; `jobs cancel` ends a job that has
    not ended, and says why it cannot when it has (exit 1, the status code named)."""
    target = grpc_service.target
    async with Client(target) as c:
        await c.create_job("GENERIC", job_id="ev-1")
        await c.report_progress("ev-1", 10, message="first")
        await c.report_progress("ev-1", 20, message="second")
    code, out, err = await cli_result("jobs", "events", "ev-1", "--target", target)
    assert code == 0, err
    assert [e["progress"]["message"] for e in json.loads(out)["events"]] == ["first", "second"]
    code, out, err = await cli_result(
        "jobs", "events", "ev-1", "--from-sequence", "1", "--target", target
    )
    assert [e["progress"]["message"] for e in json.loads(out)["events"]] == ["second"]
    code, out, err = await cli_result(
        "jobs", "cancel", "ev-1", "--reason", "not needed", "--target", target
    )
    assert code == 0, err
    assert json.loads(out)["state"] == "JOB_STATE_CANCELLED"
    code, out, err = await cli_result("jobs", "cancel", "ev-1", "--target", target)
    assert code == 1 and "FAILED_PRECONDITION" in err and out == ""
    code, _, err = await cli_result("jobs", "cancel", "nope", "--target", target)
    assert code == 1 and "NOT_FOUND" in err


async def test_jobs_delete(grpc_service: ServiceHandle) -> None:
    """`jobs delete` deletes an ended job and prints its id; a job that has not ended
    or is not there: exit 1, the status code named, nothing on stdout."""
    target = grpc_service.target
    async with Client(target) as c:
        await c.create_job("GENERIC", job_id="del-cli")
    code, out, err = await cli_result("jobs", "delete", "del-cli", "--target", target)
    assert code == 1 and out == ""
    assert "FAILED_PRECONDITION" in err and "QUEUED" in err
    await cli_result("jobs", "cancel", "del-cli", "--target", target)
    code, out, err = await cli_result("jobs", "delete", "del-cli", "--target", target)
    assert code == 0, err
    assert json.loads(out) == {"id": "del-cli", "deleted": True}
    code, out, err = await cli_result("jobs", "delete", "del-cli", "--target", target)
    assert code == 1 and "NOT_FOUND" in err and out == ""
    code, out, _ = await cli_result("jobs", "--help")
    assert "delete" in out


async def test_cli_help_names_each_option_and_jobs_wants_an_action() -> None:
    code, out, err = await cli_result("jobs")
    assert code == 2 and "jobs: error: the following arguments are required: ACTION" in err
    code, out, _ = await cli_result("jobs", "list", "--help")
    assert code == 0
    assert "{," not in out  # no empty choice shown for "any"
    for described in ("only jobs in this state", "only this kind", "only jobs with this label"):
        assert described in out
    assert "JOBWIRE_SERVICE_TARGET" in out
    code, out, _ = await cli_result("logs", "--help")
    assert "{," not in out and "only lines of this level" in out
    # The client makes a job's id (and token) so that a retried create is the same job;
    # the help said the service made it. `jobwire --help` named neither events nor tail.
    code, out, _ = await cli_result("jobs", "create", "--help")
    assert "a random UUID the client makes" in " ".join(out.split()), out
    code, out, _ = await cli_result("--help")
    assert "their events; tail them all" in " ".join(out.split()), out
    # No command is a usage error: the help on stderr, as argparse's errors (stdout).
    code, out, err = await cli_result()
    assert (code, out) == (2, "") and "usage: jobwire" in err, (code, out, err)


async def test_healthcheck_refuses_a_target_grpc_would_dial_elsewhere(
    grpc_service: ServiceHandle,
) -> None:
    """gRPC reads a port past 65535 modulo 65536: `healthcheck --target` the service's
    port + 65536 said healthy (exit 0) for a port nobody named. It is refused by name,
    as the client library refuses it, and so is a URL (exit 1 without a word before)."""
    host, port = grpc_service.target.rsplit(":", 1)
    code, _, _ = await cli_result("healthcheck", "--target", grpc_service.target)
    assert code == 0
    code, out, err = await cli_result("healthcheck", "--target", f"{host}:{int(port) + 65536}")
    assert code == 1 and out == "", err
    assert err.strip() == f"jobwire: target port must be 1-65535, got '{host}:{int(port) + 65536}'"
    code, out, err = await cli_result("healthcheck", "--target", f"http://{grpc_service.target}")
    assert code == 1 and "target is host:port, not a URL" in err, err


async def test_healthcheck_http_names_a_url_it_cannot_use(tmp_path: Path) -> None:
    """`healthcheck --http` with no scheme (`127.0.0.1:8080/readyz`, an easy slip in
    JOBWIRE_HEALTHCHECK_ARGS) exited 1 without a word: a container unhealthy for ever,
    nothing in its health log to say why. An unclosed `[` ended in a traceback."""
    async with cli_bridge_process("127.0.0.1:1", tmp_path) as bridge:
        code, out, err = await cli_result("healthcheck", "--http", f"{bridge.url}/healthz")
        assert code == 0, out + err
        for url in (f"127.0.0.1:{bridge.port}/healthz", "http://[::1/healthz", "http:///x"):
            code, out, err = await cli_result("healthcheck", "--http", url)
            assert code == 1 and out == "", err
            assert err.strip() == (
                "jobwire: --http wants an http(s) URL such as"
                f" http://127.0.0.1:8080/readyz, got {url!r}"
            ), err


async def test_output_cut_short_by_its_reader_ends_quietly(grpc_service: ServiceHandle) -> None:
    """`jobwire jobs list --all | head` ended with a BrokenPipeError traceback."""
    async with Client(grpc_service.target) as c:
        for i in range(300):  # ~200 KB of JSON: more than a pipe holds
            await c.create_job("GENERIC", job_id=f"pipe-{i}", labels={"note": "x" * 250})
    command = (
        f"set -o pipefail; {sys.executable} -m cli jobs list --all"
        f" --target {grpc_service.target} | head -c 100 >/dev/null"
    )
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", command, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 2 * WAIT)
    assert proc.returncode == 141, err  # 128 + SIGPIPE, as `cat` reports
    assert err == b""


async def test_jobs_events_prints_a_history_too_big_for_one_answer(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """64 events of 64 KiB do not fit in one ListJobEvents answer (3 MiB): `jobs events`
    printed the newest that fit and a gap; it now reads them by pages and prints all 64."""
    handle = await big_history("embedded", tmp_path, request)
    try:
        code, out, err = await cli_result("jobs", "events", "long", "--target", handle.target)
        assert code == 0, err
        printed = json.loads(out)
        assert [int(e["sequence"]) for e in printed["events"]] == list(range(1, 65))
        assert "gap" not in printed
    finally:
        await handle.close()


async def test_jobs_events_says_every_gap(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The oldest events are gone (the first gap, in the JSON), and more are pruned
    between two of its pages: that second gap is said on stderr where the list jumps
    (it was dropped without a word)."""
    handle = await big_history("embedded", tmp_path, request)
    proxy = await FaultProxy(handle.target).start()
    try:
        for i in range(6):  # retained: 7-70
            await handle.stub.ReportEvent(progress("long", 50, key=f"more{i}", message=BIG))

        async def prune() -> None:  # after the first page: retained 67-130
            for i in range(60):
                await handle.stub.ReportEvent(progress("long", 60, key=f"late{i}"))

        proxy.after_reply["ListJobEvents"] = prune
        code, out, err = await cli_result("jobs", "events", "long", "--target", proxy.target)
        assert code == 0, err
        printed = json.loads(out)
        seqs = [int(e["sequence"]) for e in printed["events"]]
        assert printed["gap"] == {"jobId": "long", "oldestAvailableSequence": "7"}
        first_page = seqs[: seqs.index(67)]
        assert first_page == list(range(7, first_page[-1] + 1)) and seqs[-1] == 130
        assert seqs[len(first_page) :] == list(range(67, 131))
        jump = f"events {first_page[-1] + 1}–66 no longer retained (gap); resuming at 67"
        assert f"jobwire: {jump}" in err, err
    finally:
        await proxy.close()
        await handle.close()


async def _tail(target: str, *args: str) -> tuple[asyncio.subprocess.Process, str]:
    """`jobwire jobs tail` running, once it has said on stderr that it is live; the
    position it says to resume from."""
    proc = await cli_process("jobs", "tail", "--target", target, *args)
    assert proc.stderr is not None
    line = (await asyncio.wait_for(proc.stderr.readline(), WAIT)).decode()
    assert line.startswith("jobwire: live; resume from here with --after "), line
    return proc, line.rsplit(" ", 1)[1].strip()


async def _lines(proc: asyncio.subprocess.Process, n: int) -> list[dict[str, Any]]:
    assert proc.stdout is not None
    return [json.loads(await asyncio.wait_for(proc.stdout.readline(), WAIT)) for _ in range(n)]


async def test_jobs_tail_prints_the_firehose_and_resumes_from_a_position(
    grpc_service: ServiceHandle,
) -> None:
    """`jobs tail` prints what happens from when it says it is live, filtered, one JSON
    line per event with its position; `--after` a position (the live one or a printed
    one) resumes there, each event once; Ctrl-C ends it as a SIGINT."""
    target = grpc_service.target
    proc, live_at = await _tail(target, "--kind", "TRANSCODE")
    async with Client(target) as c:
        await c.create_job("GENERIC", job_id="tail-other")
        await c.report_progress("tail-other", 5)  # another kind: not printed
        await c.create_job("TRANSCODE", job_id="tail-1")
        await c.report_progress("tail-1", 10, message="first")
        await c.report_progress("tail-1", 20, message="second")
        got = await _lines(proc, 2)
        assert [(g["event"]["jobId"], g["event"]["sequence"]) for g in got] == [
            ("tail-1", "1"),
            ("tail-1", "2"),
        ]
        assert got[1]["event"]["progress"]["message"] == "second"
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), WAIT) == -signal.SIGINT
        await c.report_progress("tail-1", 30, message="while nobody tails")

        resumed, _ = await _tail(target, "--kind", "TRANSCODE", "--after", got[0]["position"])
        again = await _lines(resumed, 2)
        assert [g["event"]["sequence"] for g in again] == ["2", "3"]
        resumed.send_signal(signal.SIGINT)
        await asyncio.wait_for(resumed.wait(), WAIT)

        from_live, _ = await _tail(target, "--kind", "TRANSCODE", "--after", live_at)
        every = await _lines(from_live, 3)
        assert [g["event"]["sequence"] for g in every] == ["1", "2", "3"]
        from_live.send_signal(signal.SIGINT)
        await asyncio.wait_for(from_live.wait(), WAIT)


async def test_jobs_tail_prints_a_deletion(grpc_service: ServiceHandle) -> None:
    """A deleted job is a `{"deleted": ..., "position": ...}` line."""
    target = grpc_service.target
    proc, _ = await _tail(target, "--kind", "EXTRACTION")
    try:
        async with Client(target) as c:
            await c.create_job("EXTRACTION", job_id="tail-del")
            await c.complete("tail-del")
            await c.delete_job("tail-del")
        ended, deleted = await _lines(proc, 2)
        assert ended["event"]["type"] == "EVENT_TYPE_COMPLETED"
        assert deleted["deleted"]["jobId"] == "tail-del", deleted
        assert deleted["deleted"]["state"] == "JOB_STATE_SUCCEEDED"
        assert deleted["position"] and deleted["position"] != ended["position"]
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), WAIT)


async def test_jobs_tail_says_when_it_cannot_reach_the_service(tmp_path: Path) -> None:
    """`jobs tail` started before the service (or with a wrong --target) printed nothing
    while it retried: it now says so on stderr, as `watch` does on its progress line,
    and goes live once the service is there; stdout keeps to the JSON lines."""
    port = free_port()
    proc = await cli_process("jobs", "tail", "--target", f"127.0.0.1:{port}")
    assert proc.stderr is not None and proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stderr.readline(), WAIT)).decode()
        assert re.match(r"jobwire: retrying in \d+\.\d s: UNAVAILABLE: ", line), line
        handle = await start_service(
            EmbeddedStore(tmp_path / "d", make_policy()), grpc_addr=f"127.0.0.1:{port}"
        )
        try:
            while line.startswith("jobwire: retrying in "):
                line = (await asyncio.wait_for(proc.stderr.readline(), WAIT)).decode()
            assert line.startswith("jobwire: live; resume from here with --after "), line
            async with Client(handle.target) as c:
                await c.create_job("GENERIC", job_id="tail-late")
                await c.report_progress("tail-late", 10)
            (printed,) = await _lines(proc, 1)
            assert printed["event"]["jobId"] == "tail-late"
            # A restart: once back, it says so (no event need come); its last word on
            # stderr was "retrying in 2.7 s: UNAVAILABLE", for as long as nothing happened.
            await handle.close()
            line = (await asyncio.wait_for(proc.stderr.readline(), WAIT)).decode()
            assert line.startswith("jobwire: retrying in "), line
            handle = await start_service(
                EmbeddedStore(tmp_path / "d", make_policy()), grpc_addr=f"127.0.0.1:{port}"
            )
            while line.startswith("jobwire: retrying in "):
                line = (await asyncio.wait_for(proc.stderr.readline(), WAIT)).decode()
            assert line == f"jobwire: reconnected; resuming after {printed['position']}\n", line
        finally:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), WAIT)
            await handle.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_empty_lists_are_printed_as_empty_lists(grpc_service: ServiceHandle) -> None:
    """`jobs list` matching nothing printed `{}` (protobuf leaves an empty repeated field
    out), which `jq '.jobs[]'` cannot iterate; every list prints its field, empty.
    `logs --job` filters lines by the id they carry, which need not name a job (the
    video worker logs a video id, or UNKNOWN): no lines is an empty list, not NOT_FOUND."""
    target = grpc_service.target
    async with Client(target) as c:
        await c.create_job("GENERIC", job_id="quiet-1")
        await c.write_log("no job of this id", job_id="video-without-a-job")
    for args, printed in [
        (("jobs", "list", "--label", "nope=x"), {"jobs": []}),
        (("jobs", "list", "--all", "--label", "nope=x"), {"jobs": []}),
        (("logs", "--job", "nope"), {"entries": []}),
        (("jobs", "events", "quiet-1"), {"events": []}),
    ]:
        code, out, err = await cli_result(*args, "--target", target)
        assert (code, json.loads(out)) == (0, printed), (args, out, err)
    code, out, err = await cli_result("logs", "--job", "video-without-a-job", "--target", target)
    assert [e["message"] for e in json.loads(out)["entries"]] == ["no job of this id"], err


async def test_jobs_tail_says_a_service_without_its_event_log_cannot_be_resumed(
    tmp_path: Path,
) -> None:
    """With JOBWIRE_FIREHOSE_RETENTION=off the service gives no positions: `jobs tail`
    said `resume from here with --after ` and nothing after it; it now says it cannot
    resume. `--after 0` is refused in words that match `off` as well as `0`."""
    policy = make_policy()
    policy.firehose_retention_ns = 0
    handle = await start_service(EmbeddedStore(tmp_path / "d", policy))
    try:
        proc = await cli_process("jobs", "tail", "--target", handle.target)
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), WAIT)).decode()
        assert line == (
            "jobwire: live; the service keeps no event log (JOBWIRE_FIREHOSE_RETENTION=off),"
            " so this tail cannot be resumed with --after\n"
        ), line
        async with Client(handle.target) as c:
            await c.create_job("GENERIC", job_id="unlogged")
            await c.report_progress("unlogged", 10)
        (printed,) = await _lines(proc, 1)
        assert printed["event"]["jobId"] == "unlogged" and printed["position"] == ""
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), WAIT)
        code, out, err = await cli_result("jobs", "tail", "--after", "0", "--target", handle.target)
        assert code == 1 and out == "", (out, err)
        assert "JOBWIRE_FIREHOSE_RETENTION is off or 0" in err, err
    finally:
        await handle.close()


async def test_watch_exits_1_on_a_service_error(tmp_path: Path) -> None:
    """`watch` of a job that does not exist, or with a wrong token, exited 2 (argparse's
    status for a usage error); a service error is status 1, as for the other commands."""
    handle = await start_service(
        EmbeddedStore(tmp_path / "d", make_policy()), grpc_token="right-token"
    )
    try:
        env = {"JOBWIRE_GRPC_TOKEN": "right-token"}
        code, _, err = await cli_result("watch", "nope", "--target", handle.target, env=env)
        assert code == 1 and "jobwire watch: NOT_FOUND:" in err, err
        env = {"JOBWIRE_GRPC_TOKEN": "wrong-token"}
        code, _, err = await cli_result("watch", "nope", "--target", handle.target, env=env)
        assert code == 1 and "jobwire watch: UNAUTHENTICATED:" in err, err
    finally:
        await handle.close()


async def test_a_video_job_without_video_url_is_a_usage_error(tmp_path: Path) -> None:
    """`jobs create --kind VIDEO` without --video-url made a job the video worker got
    as {"videoUrl": ""}; the service now refuses it, and the CLI says so first, as a
    usage error naming the option: status 2, nothing sent."""
    handle = await start_service(EmbeddedStore(tmp_path / "d", make_policy()))
    try:
        create = ("jobs", "create", "--kind", "VIDEO", "--id", "v-1", "--target", handle.target)
        for extra in ((), ("--video-url", ""), ("--title", "Talk")):
            code, out, err = await cli_result(*create, *extra)
            assert code == 2 and out == "" and "Traceback" not in err, (extra, err)
            assert err.splitlines()[-1] == (
                "jobwire jobs create: error: --video-url is required for --kind VIDEO"
            ), err
        # The video's other fields without its url, on another kind: they were dropped
        # without a word and the job made without them.
        generic = ("jobs", "create", "--kind", "GENERIC", "--id", "g-1", "--target", handle.target)
        for extra in (("--title", "Talk"), ("--playlist", "p"), ("--subtitle", "s")):
            code, out, err = await cli_result(*generic, *extra)
            assert code == 2 and out == "" and "Traceback" not in err, (extra, err)
            assert err.splitlines()[-1] == (
                "jobwire jobs create: error: --title, --playlist and --subtitle go with"
                " --video-url (a VIDEO job's)"
            ), err
        async with Client(handle.target) as c:
            assert [j.id async for j in c.list_jobs()] == []
        code, out, err = await cli_result(*create, "--video-url", "https://v.example/a.mp4")
        assert code == 0, err
        assert json.loads(out)["job"]["video"]["url"] == "https://v.example/a.mp4"
    finally:
        await handle.close()


async def test_a_label_given_twice_or_malformed_is_a_usage_error(tmp_path: Path) -> None:
    """`jobs list --label team=a --label team=b` ("repeatable: all of them") listed
    team=b's jobs: the last value silently won, and `jobs create` likewise kept one of
    two. A malformed --label was status 1, not a usage error's 2. Both are now
    argparse's usage error naming the option; the same label twice is taken."""
    handle = await start_service(EmbeddedStore(tmp_path / "d", make_policy()))
    try:
        async with Client(handle.target) as c:
            await c.create_job("GENERIC", job_id="team-a", labels={"team": "a"})
            await c.create_job("GENERIC", job_id="team-b", labels={"team": "b"})
        target = ("--target", handle.target)
        for args, said in [
            (("jobs", "list", "--label", "team=a", "--label", "team=b"),
             "argument --label: 'team' given twice ('a' and 'b'); a job has one value per label"),
            (("jobs", "create", "--kind", "GENERIC", "--label", "k=1", "--label", "k=2"),
             "argument --label: 'k' given twice ('1' and '2'); a job has one value per label"),
            (("jobs", "list", "--label", "team"), "argument --label: wants KEY=VALUE, got 'team'"),
            (("jobs", "list", "--label", "=a"), "argument --label: wants KEY=VALUE, got '=a'"),
        ]:  # fmt: skip
            code, out, err = await cli_result(*args, *target)
            assert code == 2 and out == "" and "Traceback" not in err, (args, err)
            assert err.splitlines()[-1].endswith(said), (args, err)
        async with Client(handle.target) as c:
            assert sorted([j.id async for j in c.list_jobs()]) == ["team-a", "team-b"]
        code, out, err = await cli_result(
            "jobs", "list", "--label", "team=a", "--label", "team=a", *target
        )
        assert code == 0, err
        assert [j["id"] for j in json.loads(out)["jobs"]] == ["team-a"]
    finally:
        await handle.close()


async def test_numbers_out_of_range_are_usage_errors() -> None:
    """A --from-sequence past int64 gave protobuf's ValueError traceback; --page-size 0
    and --limit 0 were taken (the service's default answered instead), though --help
    says 1-1000. Each is now argparse's usage error naming the option and its range."""
    for args, said in [
        (("jobs", "events", "doc-1", "--from-sequence", "99999999999999999999999"),
         "argument --from-sequence: must be 0-9223372036854775807, got 99999999999999999999999"),
        (("watch", "doc-1", "--from-sequence", "-1"),
         "argument --from-sequence: must be 0-9223372036854775807, got -1"),
        (("jobs", "list", "--page-size", "0"), "argument --page-size: must be 1-1000, got 0"),
        (("jobs", "list", "--page-size", "1001"), "argument --page-size: must be 1-1000, got 1001"),
        (("logs", "--limit", "0"), "argument --limit: must be 1-1000, got 0"),
        (("logs", "--limit", "ten"), "argument --limit: must be a whole number, got 'ten'"),
    ]:  # fmt: skip
        code, out, err = await cli_result(*args, "--target", "127.0.0.1:1")
        assert code == 2 and out == "" and "Traceback" not in err, (args, err)
        assert err.splitlines()[-1].endswith(said), (args, err)


async def _line_with(stream: asyncio.StreamReader | None, text: str) -> str:
    """The first line that holds `text` (the lines before it read and dropped)."""
    assert stream is not None
    while True:
        line = (await asyncio.wait_for(stream.readline(), WAIT)).decode()
        assert line, f"ended before a line with {text!r}"
        if text in line:
            return line


async def test_watch_resumes_with_the_create_time_it_printed_and_refuses_a_job_made_again(
    grpc_service: ServiceHandle,
) -> None:
    """`watch --from-sequence` could not pass the watched job's create time, so a resume
    across a delete and re-make of the job followed the new job as the old one's rest
    (the library's `watch_job(created=)` refuses it). A watch stopped early prints how
    to resume, create time included; `--created` refuses another job under the id."""
    target = grpc_service.target
    async with Client(target) as c:
        await c.create_job("GENERIC", job_id="again")
        proc = await cli_process("watch", "again", "--target", target)
        await c.report_progress("again", 20, message="two")
        await _line_with(proc.stdout, "20.0%")  # the history before it yielded too
        job = await c.get_job("again")
        made = job.create_time.ToDatetime(tzinfo=UTC).isoformat()
        proc.send_signal(signal.SIGINT)
        hint = await _line_with(proc.stderr, "resume")
        assert await asyncio.wait_for(proc.wait(), WAIT) == -signal.SIGINT
        resume = ("--from-sequence", str(job.sequence), "--created", made)
        assert (
            hint == f"jobwire: stopped after event {job.sequence}; resume with {' '.join(resume)}\n"
        )

        await c.complete("again")  # the same job: resumed, to its end
        code, out, err = await cli_result("watch", "again", *resume, "--target", target)
        assert code == 0 and "SUCCEEDED" in out, (out, err)
        assert "resume" not in err, err  # it ended: nothing to resume
        # The createTime `jobs get` prints (RFC 3339, "Z") is taken as well.
        code, out, err = await cli_result("jobs", "get", "again", "--target", target)
        printed = json.loads(out)["createTime"]
        code, out, err = await cli_result(
            "watch", "again", *resume[:2], "--created", printed, "--target", target
        )
        assert code == 0 and "SUCCEEDED" in out, (printed, out, err)

        await c.delete_job("again")
        await c.create_job("GENERIC", job_id="again")
        await c.complete("again")
        code, out, err = await cli_result("watch", "again", *resume, "--target", target)
        assert code == 1 and "SUCCEEDED" not in out, (out, err)
        assert "jobwire watch: NOT_FOUND: job 'again' is not the job this watch followed" in err
        assert "resume with" not in err, err

    for value, said in [
        ("yesterday", "must be an ISO 8601 time such as 2026-01-31T12:00:00.123456+00:00"),
        ("2026-11-28T21:00:00", "must give its UTC offset (+00:00 or Z)"),
    ]:
        code, out, err = await cli_result("watch", "x", "--created", value, "--target", target)
        assert code == 2 and out == "", err
        assert f"argument --created: {said}, got {value!r}" in err, err
