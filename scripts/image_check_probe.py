"""What `make image-check` asks of the running image, from the host: gRPC health
SERVING, a job created over gRPC, and one callback of each contract answered by the
bridge inside the container and committed by the service inside the other one.

Usage: image_check_probe.py GRPC_TARGET BRIDGE_URL (secrets from the environment).
Exits non-zero, naming the failed check, when one fails."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobwire.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc


def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def wait_serving(channel: grpc.Channel, seconds: float = 60.0) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + seconds
    while True:
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("image-check: gRPC health never reported SERVING")
        time.sleep(0.5)


def wait_ready(url: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("image-check: the bridge never answered /readyz with 200")
        time.sleep(0.5)


def check(name: str, ok: bool, detail: object) -> None:
    if not ok:
        raise SystemExit(f"image-check: {name} failed: {detail}")
    print(f"image-check: {name}: ok", flush=True)


def main() -> None:
    target, url = sys.argv[1], sys.argv[2].rstrip("/")
    env = os.environ
    channel = grpc.insecure_channel(target)
    wait_serving(channel)
    check("gRPC health SERVING", True, "")
    stub = job_service_pb2_grpc.JobServiceStub(channel)

    def create(kind: int, job: job_pb2.Job | None = None) -> job_service_pb2.CreateJobResponse:
        job = job or job_pb2.Job()
        job.kind = kind  # type: ignore[assignment]
        request = job_service_pb2.CreateJobRequest(job=job, job_id=f"ic-{uuid.uuid4().hex[:12]}")
        return stub.CreateJob(request, timeout=10)

    def state(job_id: str) -> int:
        return stub.GetJob(job_service_pb2.GetJobRequest(id=job_id), timeout=10).state

    batch = create(job_pb2.JOB_KIND_BATCH)
    check("job created over gRPC", state(batch.job.id) == job_pb2.JOB_STATE_QUEUED, batch)
    wait_ready(url)

    body = {
        "jobId": batch.job.id,
        "status": "success",
        "outputKey": "out/ic.mp4",
        "callbackSecret": env["BATCH_CALLBACK_SECRET"],
    }
    answer = post(f"{url}/api/batch-callback", body, {})
    done = state(batch.job.id) == job_pb2.JOB_STATE_SUCCEEDED
    check("aws_batch callback", answer[0] == 200 and done, answer)

    video = create(job_pb2.JOB_KIND_VIDEO, job_pb2.Job(video=job_pb2.Video(url="https://e/v.mp4")))
    report = {
        "status": "progress",
        "message": "downloading",
        "timestamp": "2023-05-01T12:00:00Z",
        "videoId": video.job.id,
        "percent": 45,
    }
    answer = post(f"{url}/api/report", report, {"Authorization": f"Bearer {env['API_KEY']}"})
    running = state(video.job.id) == job_pb2.JOB_STATE_RUNNING
    check("video_worker callback", answer == (200, {"success": True}) and running, answer)

    task_id = f"ic{uuid.uuid4().hex}"
    note = {
        "code": 0,
        "msg": "succeeded",
        "data": [{"task_id": task_id, "status": "succeeded", "output": "oss://b/o.mp4"}],
    }
    token = env["TRANSCODE_CALLBACK_TOKEN"]
    answer = post(f"{url}/api/transcode-callback", note, {"Authorization": f"Bearer {token}"})
    done = state(task_id) == job_pb2.JOB_STATE_SUCCEEDED
    check("aurora callback", answer == (200, {"ack": True}) and done, answer)

    extraction = create(job_pb2.JOB_KIND_EXTRACTION)
    progress = {"phase": "extract_text", "progress": 55, "message": "Seite 14/26"}
    answer = post(
        f"{url}/api/external/jobs/{extraction.job.id}",
        progress,
        {"Authorization": f"Bearer {extraction.callback_token}"},
    )
    running = state(extraction.job.id) == job_pb2.JOB_STATE_RUNNING
    check("secretary callback", answer[0] == 200 and running, answer)


if __name__ == "__main__":
    main()
