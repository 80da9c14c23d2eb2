"""In-process timings of the bridge's per-callback pieces, old way against new way.

The bench's CPU per callback swings by 10% on a shared machine; these pieces cost a
few microseconds each, so they are timed here, in one process, back to back.

Usage: python -m bench.micro [--number N]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import timeit
import uuid
from collections.abc import Callable

import orjson
from prometheus_client import Counter, Histogram

from http_bridge.metrics import _record, new_request_id
from http_bridge.secretary import ProgressEvent
from http_bridge.shared_counts import BUCKETS
from jobwire.v1 import job_pb2
from jobwire.v1 import job_service_pb2 as svc

RAW = b'{"phase":"extract_text","progress":12.34,"message":"c0 page 1234","process":{"id":"s"}}'
KEY = "secretary:" + "a" * 64
TOKEN = "t" * 43


def old_event() -> svc.ReportEventRequest:
    event = svc.ReportEventRequest(job_id="x-00001", idempotency_key=KEY, callback_token=TOKEN)
    event.progress.phase = "extract_text"
    event.progress.percent = 12.34
    event.progress.message = "c0 page 1234"
    event.process_id = "s"
    return event


def new_event() -> svc.ReportEventRequest:
    return svc.ReportEventRequest(
        job_id="x-00001",
        idempotency_key=KEY,
        callback_token=TOKEN,
        progress=job_pb2.Progress(phase="extract_text", percent=12.34, message="c0 page 1234"),
        process_id="s",
    )


# prometheus_client's own metric objects (as the bridge had them until its collector).
OLD_CALLBACKS = Counter("old_callbacks", "x", ["contract", "status"], registry=None)
OLD_LATENCY = Histogram("old_latency", "x", ["contract"], buckets=BUCKETS, registry=None)
OLD_CHILDREN = (OLD_CALLBACKS.labels("secretary", "200"), OLD_LATENCY.labels("secretary"))


def old_metrics() -> None:
    OLD_CALLBACKS.labels("secretary", "200").inc()
    OLD_LATENCY.labels("secretary").observe(0.003)


def children_metrics() -> None:
    OLD_CHILDREN[0].inc()
    OLD_CHILDREN[1].observe(0.003)


def old_reply() -> None:
    """The service's BatchReportEvents reply for 100 events, results built then copied."""
    results = [
        svc.ReportEventResult(
            response=svc.ReportEventResponse(
                job_id="x-00001", sequence=i, state=job_pb2.JOB_STATE_RUNNING
            )
        )
        for i in range(100)
    ]
    svc.BatchReportEventsResponse(results=results).SerializeToString()


def new_reply() -> None:
    """The same reply with its results filled in place."""
    reply = svc.BatchReportEventsResponse()
    add = reply.results.add
    for i in range(100):
        response = add().response
        response.job_id = "x-00001"
        response.sequence = i
        response.state = job_pb2.JOB_STATE_RUNNING
    reply.SerializeToString()


PAIRS: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
    ("request id: uuid4().hex -> prefix + counter", lambda: uuid.uuid4().hex, new_request_id),
    ("metrics: labels() per call -> children kept", old_metrics, children_metrics),
    (
        "metrics: prometheus children -> plain numbers + collector",
        children_metrics,
        lambda: _record("secretary", 200, 0.003),
    ),
    ("protobuf: attribute sets -> one constructor (not kept)", old_event, new_event),
    (
        "pydantic: orjson + model_validate -> model_validate_json (not done)",
        lambda: ProgressEvent.model_validate(orjson.loads(RAW)),
        lambda: ProgressEvent.model_validate_json(RAW),
    ),
    ("service reply of 100 events: results copied -> filled in place", old_reply, new_reply),
]


def per_call_us(fn: Callable[[], object], number: int) -> float:
    return timeit.timeit(fn, number=number) / number * 1e6


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    p.add_argument("--number", type=int, default=20_000, help="calls per sample")
    p.add_argument("--samples", type=int, default=30, help="alternating samples per side")
    args = p.parse_args()
    # Old and new alternate sample by sample, so a busy neighbour hits both alike;
    # the median of each side is printed.
    for name, old, new in PAIRS:
        a: list[float] = []
        b: list[float] = []
        for _ in range(args.samples):
            a.append(per_call_us(old, args.number))
            b.append(per_call_us(new, args.number))
        print(f"{name}: {statistics.median(a):.2f} -> {statistics.median(b):.2f} us")
    digest = [
        per_call_us(lambda: hashlib.sha256(TOKEN.encode()).digest(), args.number)
        for _ in range(args.samples)
    ]
    print(f"token digest (SHA-256, per event in the service): {statistics.median(digest):.2f} us")


if __name__ == "__main__":
    main()
