"""Bridge operations: `/metrics`, callbacks counted by contract and status, request ids.

- jobwire_bridge_callbacks_total{contract,status}: answered contract requests
  (contract = aws_batch, video_worker, aurora, secretary)
- jobwire_bridge_request_duration_seconds{contract}: their latency
- X-Request-ID: taken from the request when well-formed (else a new one), echoed
  on the response, stamped on log records (`request_id`) and sent to the service as
  gRPC metadata `x-request-id`.
- The channel to the service (TLS, token, request id) is in service_channel.py.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import SystemRoute
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample

from .shared_counts import (
    BUCKETS,
    CONTRACT_INDEX,
    CONTRACTS,
    HEAD_TIMEOUTS,
    HISTOGRAM_SUM,
    OPEN,
    REFUSED,
    SLABS,
    Slabs,
    callback_slot,
    histogram_slot,
    statuses_seen,
)

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar(
    "jobwire_bridge_request_id", default=""
)
HEADER = "X-Request-ID"
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

ROUTE_CONTRACTS: web.AppKey[dict[str, str]] = web.AppKey("jobwire_contract_of_route", dict)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def install(app: web.Application, contracts: Mapping[str, web.RouteTableDef]) -> None:
    """Adds the middleware and GET /metrics; `contracts` names each route table."""
    app[ROUTE_CONTRACTS] = {
        f"{route.method} {route.path}": name
        for name, table in contracts.items()
        for route in table
        if isinstance(route, web.RouteDef)
    }
    app.middlewares.append(observe)
    app.router.add_get("/metrics", metrics)
    _stamp_log_records()


# A new request id: this process's random prefix and a counter - as unique as a uuid4,
# at a tenth of its cost (16 random bytes and a UUID object per request).
_id_prefix = secrets.token_hex(8)
_id_counter = itertools.count(1)


def _new_id_prefix() -> None:
    global _id_prefix, _id_counter
    _id_prefix = secrets.token_hex(8)
    _id_counter = itertools.count(1)


os.register_at_fork(after_in_child=_new_id_prefix)  # JOBWIRE_HTTP_WORKERS forks


def new_request_id() -> str:
    return f"{_id_prefix}{next(_id_counter):016x}"  # 32 hex digits, like uuid4().hex


# The callback counter and latency histogram as plain numbers in shared memory
# (shared_counts.py: every JOBWIRE_HTTP_WORKERS process counts into its own slab and a
# scrape sums them), rendered by a collector at scrape time in the exposition
# prometheus_client's Counter and Histogram give (names, labels, cumulative buckets,
# `_created`). Their locks and per-bucket loops cost 1-3 us per callback.
def _record(contract: str, status: int, seconds: float | None, slabs: Slabs = SLABS) -> None:
    index = CONTRACT_INDEX.get(contract)
    if index is not None:
        slabs.callback(index, status, seconds)


class _BridgeCollector:
    def __init__(self, slabs: Slabs) -> None:
        self.slabs = slabs

    def collect(self) -> Iterator[Metric]:
        counts, created = self.slabs.totals()
        callbacks = CounterMetricFamily(
            "jobwire_bridge_callbacks",
            "Answered worker callbacks by contract and HTTP status",
            labels=["contract", "status"],
        )
        latency = HistogramMetricFamily(
            "jobwire_bridge_request_duration_seconds",
            "Latency of worker callbacks by contract",
            labels=["contract"],
        )
        created_samples = []
        for index, contract in enumerate(CONTRACTS):
            for status in statuses_seen(counts, index):
                slot = callback_slot(index, status)
                callbacks.add_metric([contract, str(status)], counts[slot], created=created[slot])
            base = histogram_slot(index)
            if not created[base]:
                continue  # no answer timed yet
            cumulative, buckets = 0.0, []
            for offset, bound in enumerate((*BUCKETS, float("inf"))):
                cumulative += counts[base + offset]
                buckets.append((_bound_text(bound), cumulative))
            latency.add_metric([contract], buckets, counts[base + HISTOGRAM_SUM])
            created_samples.append(
                Sample(f"{latency.name}_created", {"contract": contract}, created[base])
            )
        latency.samples.extend(created_samples)
        yield callbacks
        yield latency
        yield GaugeMetricFamily(
            "jobwire_bridge_open_connections", "HTTP connections open now", counts[OPEN]
        )
        for slot, name, text in (
            (
                REFUSED,
                "jobwire_bridge_refused_connections",
                "Connections refused (JOBWIRE_MAX_CONNECTIONS)",
            ),
            (
                HEAD_TIMEOUTS,
                "jobwire_bridge_header_timeouts",
                "Connections closed: request head too slow",
            ),
        ):
            since = created[slot] or self.slabs.started
            yield CounterMetricFamily(name, text, counts[slot], created=since)


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


REGISTRY.register(_BridgeCollector(SLABS))


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get(HEADER, "")
    request_id = given if given and _VALID_ID.fullmatch(given) else new_request_id()
    REQUEST_ID.set(request_id)
    contract = _contract_of(request)
    start = time.perf_counter()
    status = 500
    streamed = False
    try:
        response = await handler(request)
        status = response.status
        # An artifact download: its time is the body's transfer to the client (minutes
        # for a slow one), not an answer's latency (JobwireAckLatencyP99High).
        streamed = type(response) is web.StreamResponse
    except web.HTTPException as exc:
        status = exc.status
        exc.headers[HEADER] = request_id
        raise
    finally:
        if contract:
            _record(contract, status, None if streamed else time.perf_counter() - start)
    if not response.prepared:
        response.headers[HEADER] = request_id
    return response


# The contract of each route, found once (routes live as long as the app).
_route_contracts: dict[tuple[object, str], str] = {}


def _contract_of(request: web.Request) -> str:
    route = request.match_info.route
    key = (route, request.method)
    contract = _route_contracts.get(key)
    if contract is None:
        resource = route.resource
        canonical = resource.canonical if resource is not None else ""
        contract = request.app[ROUTE_CONTRACTS].get(f"{request.method} {canonical}", "")
        if not isinstance(route, SystemRoute):  # made per request for a 404/405
            if len(_route_contracts) > 4096:  # many apps in one process (tests)
                _route_contracts.clear()
            _route_contracts[key] = contract
    return contract


async def metrics(_: web.Request) -> web.Response:
    body = generate_latest()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


_stamped = False


def _stamp_log_records() -> None:
    global _stamped
    if _stamped:
        return
    _stamped = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if not getattr(record, "request_id", ""):
            value = REQUEST_ID.get()
            if value:
                record.request_id = value
        return record

    logging.setLogRecordFactory(factory)
