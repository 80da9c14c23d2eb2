"""deploy/observability: the Prometheus alert rules pass `promtool check rules`, the
Grafana dashboard loads and matches the dashboard schema, its PromQL parses (promtool
again), and every metric either file names is one the code exports."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

from tests.helpers import tool_missing

ROOT = Path(__file__).resolve().parents[1]
OBS = ROOT / "deploy" / "observability"
RULES = OBS / "jobwire-alerts.yaml"
DASHBOARD = OBS / "jobwire-dashboard.json"
PROMTOOL_DEFAULT = Path("~/.cache/jobwire/promtool-v0.316.0/promtool")

# What the issue asks the alerts and the dashboard to cover.
ALERTS = {
    "JobwireStorageUnavailable": "jobwire_storage_errors_total",
    "JobwireBridge5xxRate": "jobwire_bridge_callbacks_total",
    "JobwireAckLatencyP99High": "jobwire_bridge_request_duration_seconds_bucket",
    "JobwireOldestQueuedJobTooOld": "jobwire_oldest_queued_job_age_seconds",
    "JobwireWatchersRefused": "jobwire_grpc_requests_total",
    "JobwireRetentionSweepFailing": "jobwire_retention_sweeps_total",
}
DASHBOARD_METRICS = {
    "jobwire_bridge_callbacks_total",  # callbacks/s by contract and status
    "jobwire_bridge_request_duration_seconds_bucket",  # ack latency
    "jobwire_commit_duration_seconds_bucket",  # commit latency
    "jobwire_commit_batch_size_bucket",  # batch size
    "jobwire_watchers",
    "jobwire_queue_depth",
    "jobwire_oldest_queued_job_age_seconds",
    "jobwire_storage_errors_total",
    "jobwire_jobs_stalled_total",
    "jobwire_jobs_deleted_total",  # by reason: DeleteJob or the retention
    "jobwire_retention_sweeps_total",  # completed and failed sweeps
}

# The part of Grafana's dashboard model (schemaVersion 39) an import relies on.
DASHBOARD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "time": {
            "type": "object",
            "required": ["from", "to"],
            "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
        },
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {"list": {"type": "array", "items": {"$ref": "#/$defs/variable"}}},
        },
        "panels": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/panel"}},
    },
    "$defs": {
        "variable": {
            "type": "object",
            "required": ["name", "type"],
            "properties": {"name": {"type": "string"}, "type": {"type": "string"}},
        },
        "gridPos": {
            "type": "object",
            "required": ["x", "y", "w", "h"],
            "properties": {
                "x": {"type": "integer", "minimum": 0, "maximum": 23},
                "y": {"type": "integer", "minimum": 0},
                "w": {"type": "integer", "minimum": 1, "maximum": 24},
                "h": {"type": "integer", "minimum": 1},
            },
        },
        "target": {
            "type": "object",
            "required": ["refId", "expr", "datasource"],
            "properties": {
                "refId": {"type": "string", "pattern": "^[A-Z]$"},
                "expr": {"type": "string", "minLength": 1},
                "legendFormat": {"type": "string"},
            },
        },
        "panel": {
            "type": "object",
            "required": ["id", "type", "title", "gridPos"],
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "type": {"enum": ["row", "timeseries", "stat", "gauge", "table", "bargauge"]},
                "title": {"type": "string", "minLength": 1},
                "gridPos": {"$ref": "#/$defs/gridPos"},
                "targets": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/target"}},
            },
            "if": {"properties": {"type": {"const": "row"}}},
            "then": {"required": ["panels"]},
            "else": {"required": ["targets", "datasource"]},
        },
    },
}


def promtool() -> Path:
    """The promtool binary (scripts/install-promtool.sh), or skip (fail under CI=true)."""
    path = Path(os.environ.get("JOBWIRE_PROMTOOL_BIN") or PROMTOOL_DEFAULT).expanduser()
    if path.is_file() and os.access(path, os.X_OK):
        return path
    tool_missing(f"promtool not found at {path}: run `bash scripts/install-promtool.sh`")


@cache
def rules() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return doc


@cache
def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def alert_rules() -> list[dict[str, Any]]:
    return [r for group in rules()["groups"] for r in group["rules"] if "alert" in r]


def query_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in query_panels() for t in p["targets"]]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bjobwire_[a-z_]+\b", expr))


def check_rules(tool: Path, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_promtool_accepts_the_alert_rules() -> None:
    result = check_rules(promtool(), RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_check_catches_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail: a rule with a PromQL syntax error is refused."""
    broken = rules() | {"groups": [{"name": "x", "rules": [{"alert": "X", "expr": "sum(("}]}]}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken), encoding="utf-8")
    assert check_rules(promtool(), path).returncode != 0


def test_the_issue_s_alerts_exist_with_severity_and_summary() -> None:
    by_name = {r["alert"]: r for r in alert_rules()}
    assert set(by_name) == set(ALERTS)
    for name, metric in ALERTS.items():
        rule = by_name[name]
        assert metric in rule["expr"], name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name
        assert re.fullmatch(r"\d+m", rule["for"]), name


def test_dashboard_loads_and_matches_the_schema() -> None:
    doc = dashboard()
    jsonschema.validate(doc, DASHBOARD_SCHEMA)
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in doc["templating"]["list"]}
    for panel in query_panels():
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            uid = target["datasource"]["uid"]
            assert uid.startswith("${") and uid[2:-1] in variables, panel["title"]
    # No two panels overlap on Grafana's 24-column grid.
    cells: dict[tuple[int, int], str] = {}
    for panel in doc["panels"]:
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_schema_check_catches_mistakes() -> None:
    broken = json.loads(json.dumps(dashboard()))
    del broken["panels"][1]["targets"][0]["expr"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, DASHBOARD_SCHEMA)


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    named = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert named >= DASHBOARD_METRICS, DASHBOARD_METRICS - named


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Each panel query, with Grafana's $__rate_interval filled in, as a recording rule."""
    exprs = [e.replace("$__rate_interval", "1m") for e in dashboard_exprs()]
    doc = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"jobwire:panel_{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    result = check_rules(promtool(), path)
    assert result.returncode == 0, result.stdout + result.stderr


def exported_metrics() -> set[str]:
    """Names as Prometheus sees them: counters get _total, histograms _bucket/_sum/_count."""
    source = "\n".join(
        p.read_text(encoding="utf-8")
        for top in ("service", "http_bridge")
        for p in (ROOT / top).rglob("*.py")
    )
    names: set[str] = set()
    # prometheus_client's metric objects, or the families a collector yields.
    pattern = r"\b(Counter|Gauge|Histogram)(?:MetricFamily)?\(\s*\"(jobwire_\w+)\""
    for kind, name in re.findall(pattern, source):
        if kind == "Counter":
            names.add(f"{name}_total")
        elif kind == "Histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def test_every_metric_named_is_exported_by_the_code() -> None:
    exported = exported_metrics()
    assert "jobwire_commit_batch_size_bucket" in exported  # the scan itself works
    named = set().union(*(metric_names(e) for e in dashboard_exprs()))
    named |= set().union(*(metric_names(r["expr"]) for r in alert_rules()))
    assert named <= exported, f"not exported by service/ or http_bridge/: {named - exported}"


def _scraped_names(scrape: str) -> tuple[set[str], set[str]]:
    """Sample names and TYPE'd family names in a Prometheus text scrape."""
    samples = set(re.findall(r"^(jobwire_\w+)", scrape, re.MULTILINE))
    families = set(re.findall(r"^# TYPE (jobwire_\w+) ", scrape, re.MULTILINE))
    return samples, families


def _method_selectors(expr: str) -> list[str]:
    return re.findall(r'method=~?"([^"]+)"', expr)


async def test_every_metric_and_method_named_is_in_a_live_scrape(tmp_path: Path) -> None:
    """The real service and bridge, after a callback went through: every metric the
    dashboard and the alerts name is in their /metrics (a sample, or the family of a
    labelled series not yet seen), and every gRPC method a query selects is one the
    service has. The ack-latency panel's service side selected only ReportEvent, which
    the bridge never calls (it batches callbacks into BatchReportEvents, as the scrape
    shows): for bridge traffic it stayed empty."""
    import dataclasses

    import aiohttp

    from jobwire.v1 import job_pb2, job_service_pb2
    from service.servicer import SERVICE
    from service.store.embedded import EmbeddedStore
    from tests.bridge_harness import BATCH_SECRET, TEST_CONFIG, running_bridge
    from tests.conftest import make_policy, start_service

    handle = await start_service(
        EmbeddedStore(tmp_path / "data", make_policy()), metrics_addr="127.0.0.1:0"
    )
    try:
        config = dataclasses.replace(TEST_CONFIG, service_target=handle.target)
        async with running_bridge(config) as bridge, aiohttp.ClientSession() as http:
            job = job_pb2.Job(kind=job_pb2.JOB_KIND_BATCH)
            await handle.stub.CreateJob(job_service_pb2.CreateJobRequest(job=job, job_id="m"))
            body = {"jobId": "m", "status": "success", "outputKey": "o"}
            body["callbackSecret"] = BATCH_SECRET
            assert (await bridge.post("/api/batch-callback", body))[0] == 200
            port = handle.running.ops.metrics.port if handle.running.ops else 0
            async with http.get(f"http://127.0.0.1:{port}/metrics") as reply:
                service_scrape = await reply.text()
            async with http.get(f"{bridge.url}/metrics") as reply:
                bridge_scrape = await reply.text()
    finally:
        await handle.close()
    samples, families = _scraped_names(bridge_scrape + service_scrape)
    exprs = [*dashboard_exprs(), *(r["expr"] for r in alert_rules())]
    named = set().union(*(metric_names(e) for e in exprs))
    family = {n: re.sub(r"_(bucket|sum|count|total)$", "", n) for n in named}
    missing = {n for n in named if n not in samples and family[n] not in families}
    assert not missing, missing

    scraped = re.findall(r'jobwire_grpc_requests_total\{[^}]*method="(\w+)"', service_scrape)
    assert "BatchReportEvents" in scraped  # how the bridge reports callbacks
    for expr in exprs:
        for selector in _method_selectors(expr):
            assert any(re.fullmatch(selector, m) for m in SERVICE.methods_by_name), expr
    latency = [e for e in dashboard_exprs() if "jobwire_grpc_request_duration_seconds" in e]
    selectors = [s for e in latency for s in _method_selectors(e)]
    assert any(re.fullmatch(s, "BatchReportEvents") for s in selectors), latency


def test_the_storage_alert_fires_on_a_store_outage_as_the_service_exports_it(
    tmp_path: Path,
) -> None:
    """`promtool test rules` on JobwireStorageUnavailable: a burst of 40 failed calls,
    then nothing. With the series exported at 0 from the start (as the service does
    now, tests/test_ops_storage.py) the alert fires; with a series born with the burst
    (as before), increase() has nothing to compare the first sample with: no alert."""
    description = (
        "{n} storage errors in 5 minutes. Callbacks get 503 and workers retry; check"
        " MongoDB (or the embedded store's disk)."
    )
    _promtool_test(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": 'jobwire_storage_errors_total{operation="rpc", job="now"}',
                        "values": "0 0 0 40 40 40 40 40",
                    },
                    {
                        "series": 'jobwire_storage_errors_total{operation="rpc", job="before"}',
                        "values": "_ _ _ 40 40 40 40 40",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "2m", "alertname": "JobwireStorageUnavailable", "exp_alerts": []},
                    {
                        "eval_time": "6m",
                        "alertname": "JobwireStorageUnavailable",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical", "job": "now"},
                                "exp_annotations": {
                                    "summary": "jobwire cannot reach its store (now)",
                                    "description": description.format(n=40),
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    )


def _counter_values(scrape: str, name: str, label: str) -> dict[str, float]:
    """{label value: sample} of one labelled counter in a Prometheus text scrape."""
    pattern = rf'^{name}_total\{{[^}}]*{label}="(\w+)"[^}}]*\}} (\S+)$'
    return {value: float(sample) for value, sample in re.findall(pattern, scrape, re.MULTILINE)}


async def test_retention_sweeps_failed_and_jobs_deleted_are_in_a_live_scrape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOBWIRE_JOB_RETENTION's sweep failing was only a log line, once per outage: the
    jobs past the retention stayed, the store grew, and no metric showed it. A real
    service with the retention on, whose store cannot list ended jobs: its /metrics
    (read over HTTP) counts failed sweeps and no completed one; once the store works,
    completed sweeps, and the ended job deleted counted under `reason="retention"`."""
    import aiohttp
    from prometheus_client import REGISTRY

    from service.store.embedded import EmbeddedStore
    from tests.conftest import make_policy, start_service
    from tests.helpers import WAIT, completed, create

    store = EmbeddedStore(tmp_path / "data", make_policy())

    async def broken(before_ns: int, limit: int) -> list[str]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "ended_jobs", broken)
    # The counters are the process's: what other tests counted, taken before any sweep.
    before = {
        (name, label, value): REGISTRY.get_sample_value(f"{name}_total", {label: value}) or 0.0
        for name, label, value in (
            ("jobwire_retention_sweeps", "result", "ok"),
            ("jobwire_retention_sweeps", "result", "failed"),
            ("jobwire_jobs_deleted", "reason", "retention"),
        )
    }
    handle = await start_service(
        store,
        metrics_addr="127.0.0.1:0",
        job_retention_seconds=0.2,
        job_retention_sweep_seconds=0.05,
    )
    try:
        port = handle.running.ops.metrics.port if handle.running.ops else 0
        async with aiohttp.ClientSession() as http:

            async def counted() -> dict[tuple[str, str, str], float]:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as reply:
                    assert reply.status == 200
                    scrape = await reply.text()
                now = {}
                for name, label, value in before:
                    now[(name, label, value)] = _counter_values(scrape, name, label)[value]
                return {key: now[key] - before[key] for key in before}

            async def until_counted(
                ok: Callable[[dict[tuple[str, str, str], float]], bool],
            ) -> dict[tuple[str, str, str], float]:
                deadline = time.monotonic() + WAIT
                while not ok(counts := await counted()):
                    assert time.monotonic() < deadline, counts
                    await asyncio.sleep(0.05)  # the polling interval of this waiter
                return counts

            sweeps = ("jobwire_retention_sweeps", "result")
            failing = await until_counted(lambda c: c[(*sweeps, "failed")] >= 3)
            assert failing[(*sweeps, "ok")] == 0, failing
            assert handle.running.retention is not None
            assert handle.running.retention.swept == []

            await create(handle.stub, job_id="old")
            await handle.stub.ReportEvent(completed("old"))
            monkeypatch.undo()  # the store lists ended jobs again
            deleted = ("jobwire_jobs_deleted", "reason", "retention")
            working = await until_counted(lambda c: c[deleted] >= 1)
            assert working[deleted] == 1, working
            assert working[(*sweeps, "ok")] >= 1, working
    finally:
        await handle.close()


def _promtool_test(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    doc = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}
    path = tmp_path / "alert-test.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    result = subprocess.run(
        [str(promtool()), "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_retention_alert_fires_only_when_every_sweep_fails(tmp_path: Path) -> None:
    """`promtool test rules` on JobwireRetentionSweepFailing, one sweep a minute (the
    default JOBWIRE_JOB_RETENTION_SWEEP_SECONDS). `broken`: every sweep fails from
    minute 5 on; it fires once no sweep has completed for an hour (and the failures
    went on for the rule's `for`). `flaky`: some sweeps fail, one in ten completes: no
    alert. `off` (no JOBWIRE_JOB_RETENTION): both series stay at 0: no alert."""
    sweeps = "jobwire_retention_sweeps_total"

    def series(job: str, result: str, values: str) -> dict[str, str]:
        return {"series": f'{sweeps}{{result="{result}", job="{job}"}}', "values": values}

    flaky_ok = " ".join(str(i // 10) for i in range(150))  # one completed sweep in ten
    flaky_failed = " ".join(str(i - i // 10) for i in range(150))
    summary = "no retention sweep of jobwire (broken) completed in an hour; 3 or more failed"
    (rule,) = [r for r in alert_rules() if r["alert"] == "JobwireRetentionSweepFailing"]
    _promtool_test(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": [
                    series("broken", "ok", "0+1x5 5+0x145"),
                    series("broken", "failed", "0+0x5 1+1x145"),
                    series("flaky", "ok", flaky_ok),
                    series("flaky", "failed", flaky_failed),
                    series("off", "ok", "0+0x150"),
                    series("off", "failed", "0+0x150"),
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "30m",
                        "alertname": "JobwireRetentionSweepFailing",
                        "exp_alerts": [],
                    },
                    {
                        "eval_time": "90m",
                        "alertname": "JobwireRetentionSweepFailing",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "job": "broken"},
                                "exp_annotations": {
                                    "summary": summary,
                                    "description": rule["annotations"]["description"],
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    )


def test_deletions_show_by_reason_and_sweeps_by_result() -> None:
    """The deletions row: DeleteJob and the retention apart (an operator's deletes
    against the sweep's), completed sweeps apart from failed ones."""
    exprs = dashboard_exprs()
    deleted = [e for e in exprs if "jobwire_jobs_deleted_total" in e]
    sweeps = [e for e in exprs if "jobwire_retention_sweeps_total" in e]
    assert any(re.search(r"by \(reason\)", e) for e in deleted), deleted
    assert any(re.search(r"by \(result\)", e) for e in sweeps), sweeps
