"""`jobwire watch`, `jobwire jobs ...` and `jobwire logs`: thin commands over the client
library (jobwire.client), which owns reconnecting, resuming, deadlines and retries.

The service address is `--target`; TLS and the bearer token come from the same
JOBWIRE_SERVICE_TLS_* / JOBWIRE_GRPC_TOKEN variables as the bridge's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from http_bridge.worker_cli import for_terminal
from jobwire.client import (
    Client,
    ClientConfigError,
    Job,
    JobDeletion,
    JobEvent,
    JobwireError,
    NotFound,
    StreamGap,
)
from jobwire.client.watch import TERMINAL, JobsWatch
from jobwire.v1 import event_pb2, job_pb2, job_service_pb2
from service.logs import printable

from .progress_bar import fit, render


async def watch(args: argparse.Namespace) -> int:
    """Follows a job until it ends: a redrawn progress line, plus a line for each gap,
    coalesced range and stall. Exit 0 when it SUCCEEDED, 1 when it ended otherwise or
    the service refused the watch (2 is argparse's, for a usage error)."""
    job = Job()
    screen = Screen(sys.stdout.isatty())
    gone = False
    async with _client(args) as client:
        try:
            # every_event=False: a slow terminal gets the latest progress, and says so.
            watch = client.watch_job(
                args.job_id,
                args.from_sequence,
                every_event=False,
                on_retry=screen.retrying,
                on_reconnect=lambda: screen.draw(job) if job.id else None,
                created=args.created,
            )
            async for item in watch:
                if isinstance(item, Job):
                    job.CopyFrom(item)
                elif isinstance(item, StreamGap):
                    screen.note(job, describe_gap(item))
                else:
                    note = describe_event(item)
                    if note:
                        screen.note(job, note)
                    if item.sequence > job.sequence:  # else replayed history: in the snapshot
                        merge(job, item)
                screen.draw(job)
        except JobwireError as err:
            screen.end()
            print(f"jobwire watch: {err.code.name}: {err.message}", file=sys.stderr)
            gone = isinstance(err, NotFound)  # nothing left to resume
            return 1
        finally:
            screen.end()  # also on Ctrl-C: the shell's prompt starts a line of its own
            if job.id and job.state not in TERMINAL and not gone:
                # Stopped before the job's end (Ctrl-C, an error): how to go on from
                # here. The create time tells a job deleted and made again under the id
                # in the meantime from this one; a sequence alone would follow it.
                resume = f"--from-sequence {watch.last_sequence}"
                if watch.created:  # unknown only from a service that sends no create time
                    resume += f" --created {watch.created.isoformat()}"
                print(
                    f"jobwire: stopped after event {watch.last_sequence}; resume with {resume}",
                    file=sys.stderr,
                )
    return 0 if job.state == job_pb2.JOB_STATE_SUCCEEDED else 1


def describe_gap(gap: StreamGap) -> str:
    if gap.oldest_available_sequence <= gap.requested_sequence:  # the history went back
        newest = gap.oldest_available_sequence - 1
        return (
            f"the job's history ends at event {newest}, before {gap.requested_sequence}"
            f" (a starting sequence past its end, another database, or a restore from an"
            f" older backup); following it from"
            f" {newest + 1}"
        )
    first, last = gap.requested_sequence + 1, gap.oldest_available_sequence - 1
    span = f"event {first}" if first == last else f"events {first}–{last}"
    return f"{span} no longer retained (gap); resuming at {gap.oldest_available_sequence}"


def describe_event(event: JobEvent) -> str:
    """A line worth keeping above the progress bar, or ""."""
    notes = []
    if event.coalesced_from_sequence:
        notes.append(f"events {event.coalesced_from_sequence}–{event.sequence} coalesced")
    if event.type == event_pb2.EVENT_TYPE_STALLED:
        notes.append(f"STALLED at event {event.sequence}: no progress within the deadline")
    return "; ".join(notes)


def merge(job: job_pb2.Job, event: JobEvent) -> None:
    """The job as the event leaves it (enough for the progress line)."""
    job.state = event.state
    job.sequence = event.sequence
    job.stalled = event.type == event_pb2.EVENT_TYPE_STALLED
    if event.HasField("progress"):
        job.progress.CopyFrom(event.progress)
    if event.HasField("error"):
        job.error.CopyFrom(event.error)
    if event.HasField("result"):
        job.progress.percent = 100.0


class Screen:
    """On a terminal: one progress line redrawn with `\r`, notes above it. Into a pipe
    or a file (`| tee`, a CI log): a line per change, nothing redrawn, no padding."""

    PIPE_WIDTH = 4096  # no terminal to fit: long messages are kept (up to this many cells)

    def __init__(self, terminal: bool) -> None:
        self.terminal = terminal
        self.last = ""
        self.ended = False

    def note(self, job: job_pb2.Job, text: str) -> None:
        if not self.terminal:
            print(text)
            return
        sys.stdout.write("\r" + fit(text, _columns() - 1) + "\n")
        if job.id:
            self.draw(job)

    def retrying(self, error: JobwireError, delay: float) -> None:
        """The service cannot be reached (or the stream dropped): said where the
        progress line stands, until the next update redraws it."""
        text = printable(f"retrying in {delay:.1f} s: {error.code.name}: {error.message}")
        if self.terminal:
            sys.stdout.write("\r" + fit(text, _columns() - 1))
        else:
            sys.stdout.write(text + "\n")
        self.last = ""  # the next update is drawn even when it did not change
        sys.stdout.flush()

    def draw(self, job: job_pb2.Job) -> None:
        if self.terminal:
            sys.stdout.write("\r" + render(job, width=_columns()))
        else:
            line = render(job, width=self.PIPE_WIDTH).rstrip()
            if line == self.last:  # a replayed event the snapshot already showed
                return
            self.last = line
            sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def end(self) -> None:
        """Ends the progress line (once), so what follows starts a line of its own."""
        if self.terminal and not self.ended:
            sys.stdout.write("\n")
            sys.stdout.flush()
        self.ended = True


def _columns() -> int:
    # shutil's: a terminal that gives 0 columns (a pty whose size was never set, under
    # `ssh -tt` from a script) is 80, or COLUMNS; os.get_terminal_size() said 0, and
    # every line was cut to nothing.
    return shutil.get_terminal_size().columns


async def create(args: argparse.Namespace) -> int:
    video = None
    if args.video_url:
        video = job_pb2.Video(
            url=args.video_url, title=args.title, playlist=args.playlist, subtitle=args.subtitle
        )
    return await _print(
        args,
        lambda c: c.create_job(args.kind, job_id=args.id, labels=args.label, video=video),
    )


async def get(args: argparse.Namespace) -> int:
    return await _print(args, lambda c: c.get_job(args.job_id))


async def events(args: argparse.Namespace) -> int:
    async def every_page(client: Client) -> job_service_pb2.ListJobEventsResponse:
        # One answer holds at most 3 MiB (the newest events of a longer history): the
        # pages, oldest first, printed as one answer with the first gap; a later one
        # (events pruned while paging) is said on stderr, where the list jumps.
        reply = job_service_pb2.ListJobEventsResponse()
        async for item in client.job_events(args.job_id, args.from_sequence):
            if isinstance(item, event_pb2.StreamGap):
                if not reply.HasField("gap"):
                    reply.gap.CopyFrom(item)
                else:
                    print(f"jobwire: {describe_gap(item)}", file=sys.stderr)
            else:
                reply.events.append(item)
        return reply

    return await _print(args, every_page)


async def tail(args: argparse.Namespace) -> int:
    """The firehose as JSON lines: `{"event": ..., "position": ...}` (pass the position
    as --after to resume there), `{"deleted": ..., "position": ...}` for a deleted job,
    or `{"gap": ...}`; "live" on stderr once every event committed from then on will be
    printed."""
    async with _client(args) as client:
        firehose = client.watch_jobs(
            kind=args.kind or job_pb2.JOB_KIND_UNSPECIFIED,
            states=args.state,
            after=args.after,
            on_retry=_say_retrying,
            on_reconnect=lambda: _say_reconnected(firehose),
        )
        said = asyncio.create_task(_say_live(firehose))
        try:
            async for item in firehose:
                if isinstance(item, StreamGap):
                    line: dict[str, Any] = {"gap": json_format.MessageToDict(item)}
                elif isinstance(item, JobDeletion):
                    line = {
                        "deleted": json_format.MessageToDict(item),
                        "position": firehose.position,
                    }
                else:
                    line = {"event": json_format.MessageToDict(item), "position": firehose.position}
                text = json.dumps(line, ensure_ascii=False)
                print(for_terminal(text), flush=True)
        except JobwireError as err:
            print(f"jobwire: {err.code.name}: {err.message}", file=sys.stderr)
            return 1
        finally:
            said.cancel()
    return 0


def _say_retrying(error: JobwireError, delay: float) -> None:
    """On stderr, as `watch` says it on its progress line: a tail started before the
    service, with a wrong --target, or across a restart printed nothing at all."""
    text = printable(f"retrying in {delay:.1f} s: {error.code.name}: {error.message}")
    print(f"jobwire: {text}", file=sys.stderr, flush=True)


def _say_reconnected(watch: JobsWatch) -> None:
    """Back after a retry (a restart): its last word on stderr was "retrying in ...", for
    as long as no event came. Before the first connection, "live" says it instead."""
    if not watch.live.is_set():
        return
    where = f"; resuming after {watch.position}" if watch.position else ""
    print(f"jobwire: reconnected{where}", file=sys.stderr, flush=True)


async def _say_live(watch: JobsWatch) -> None:
    await watch.live.wait()
    if watch.position:
        print(f"jobwire: live; resume from here with --after {watch.position}", file=sys.stderr)
    else:  # live with no position: the service keeps no log to resume from
        print(
            "jobwire: live; the service keeps no event log (JOBWIRE_FIREHOSE_RETENTION=off),"
            " so this tail cannot be resumed with --after",
            file=sys.stderr,
        )
    sys.stderr.flush()


async def cancel(args: argparse.Namespace) -> int:
    return await _print(args, lambda c: c.cancel_job(args.job_id, args.reason))


async def delete(args: argparse.Namespace) -> int:
    """Prints `{"id": ..., "deleted": true}`: DeleteJob answers nothing more."""
    async with _client(args) as client:
        try:
            await client.delete_job(args.job_id)
        except JobwireError as err:
            print(f"jobwire: {err.code.name}: {err.message}", file=sys.stderr)
            return 1
    print(for_terminal(json.dumps({"id": args.job_id, "deleted": True})))
    return 0


async def list_jobs(args: argparse.Namespace) -> int:
    filters: dict[str, Any] = {
        "states": args.state,
        "kind": args.kind or job_pb2.JOB_KIND_UNSPECIFIED,
        "labels": args.label,
        "newest_first": args.newest_first,
    }
    if not args.all:
        return await _print(
            args,
            lambda c: c.list_jobs_page(
                page_size=args.page_size, page_token=args.page_token, **filters
            ),
        )

    async def every_page(c: Client) -> Message:
        jobs = [job async for job in c.list_jobs(page_size=args.page_size, **filters)]
        return job_service_pb2.ListJobsResponse(jobs=jobs)

    return await _print(args, every_page)


async def logs(args: argparse.Namespace) -> int:
    async def entries(c: Client) -> Message:
        lines = await c.list_logs(
            job_id=args.job, level=args.level or "UNSPECIFIED", limit=args.limit
        )
        return job_service_pb2.ListLogsResponse(entries=lines)

    return await _print(args, entries)


async def _print(args: argparse.Namespace, call: Any) -> int:
    async with _client(args) as client:
        try:
            reply = await call(client)
        except JobwireError as err:
            print(f"jobwire: {err.code.name}: {err.message}", file=sys.stderr)
            return 1
    text = json.dumps(as_dict(reply), indent=2, ensure_ascii=False)
    print(for_terminal(text))
    return 0


def as_dict(reply: Message) -> dict[str, Any]:
    """The reply as JSON, with its lists even when empty: protobuf leaves an empty
    repeated field out, and `{}` for no jobs broke `jq '.jobs[]'`. Only the reply's
    own lists: the messages inside print as protobuf's JSON mapping has them."""
    out = json_format.MessageToDict(reply)
    for field in reply.DESCRIPTOR.fields:
        entry = field.message_type
        if field.is_repeated and not (entry and entry.GetOptions().map_entry):
            out.setdefault(field.json_name, [])
    return out


def _client(args: argparse.Namespace) -> Client:
    try:
        return Client.from_env(args.target)
    except ClientConfigError as err:
        raise SystemExit(f"jobwire: {err}") from None
