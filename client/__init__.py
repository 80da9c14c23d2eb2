"""jobwire.client: the asyncio client library of the jobwire service.

    from jobwire.client import Client

    async with Client("127.0.0.1:50051", token="...") as client:
        created = await client.create_job("EXTRACTION", labels={"team": "docs"})
        async for item in client.watch_job(created.job.id):
            ...  # a Job snapshot, then JobEvents (or a StreamGap); ends when the job does

See README "Using jobwire from your service".
"""

from jobwire.v1.event_pb2 import JobDeletion, JobEvent, StreamGap
from jobwire.v1.job_pb2 import Job

from .artifacts import ArtifactStream
from .channel import TLS
from .client import Client, new_idempotency_key
from .errors import (
    AlreadyExists,
    ClientConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    JobwireError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from .retry import Backoff, RetryPolicy
from .watch import TERMINAL, JobsWatch, JobsWatchItem, JobWatch, WatchItem

__all__ = [
    "TERMINAL",
    "TLS",
    "AlreadyExists",
    "ArtifactStream",
    "Backoff",
    "Client",
    "ClientConfigError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "Job",
    "JobDeletion",
    "JobEvent",
    "JobWatch",
    "JobsWatch",
    "JobsWatchItem",
    "JobwireError",
    "NotFound",
    "PermissionDenied",
    "RetryPolicy",
    "StreamGap",
    "Unauthenticated",
    "Unavailable",
    "WatchItem",
    "new_idempotency_key",
]
