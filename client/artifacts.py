"""Artifacts moved in chunks: an upload from a path, bytes or an async iterator, and
`ArtifactStream`, a download iterated chunk by chunk or saved to a path.

Neither holds more than a chunk or two in memory, whatever the artifact's size.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any

import grpc

from jobwire.v1 import artifact_pb2, job_service_pb2

from .errors import JobwireError, translate
from .retry import RETRYABLE, Ready, RetryPolicy, Sleep, say_if_closed

# A read is idempotent, so it is tried again also when the service says the artifact
# was replaced under it (ABORTED, "... was replaced; read it again").
READ_RETRYABLE = RETRYABLE | {grpc.StatusCode.ABORTED}

CHUNK = 1024 * 1024  # 1 MiB per message, as the API recommends
MAX_CHUNK = 4 * 1024 * 1024 - 1024  # the service's 4 MiB message limit, less framing

Source = str | os.PathLike[str] | bytes | AsyncIterable[bytes]


def replayable(source: Source) -> bool:
    """Whether an upload of `source` can be started again (a path or bytes can)."""
    return isinstance(source, str | os.PathLike | bytes)


def _sized(
    header: job_service_pb2.ArtifactHeader, size: int | None
) -> job_service_pb2.UploadArtifactRequest:
    """The header message, declaring `size` when known: the service then refuses an
    upload cut off by a cancel or a dropped connection instead of storing its part."""
    sized = job_service_pb2.ArtifactHeader()
    sized.CopyFrom(header)
    if size is not None:
        sized.size = size
    return job_service_pb2.UploadArtifactRequest(header=sized)


async def upload_messages(
    header: job_service_pb2.ArtifactHeader,
    source: Source,
    chunk: int = CHUNK,
    size: int | None = None,
) -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
    if isinstance(source, bytes):
        yield _sized(header, len(source))
        view = memoryview(source)
        for start in range(0, len(view), chunk):
            yield job_service_pb2.UploadArtifactRequest(data=bytes(view[start : start + chunk]))
    elif isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:  # noqa: ASYNC230 - reads go to a thread below
            # The size when opened: a file that grows or shrinks while it is read is
            # refused by the service, not stored half-changed.
            yield _sized(header, os.fstat(f.fileno()).st_size)
            while data := await asyncio.to_thread(f.read, chunk):
                yield job_service_pb2.UploadArtifactRequest(data=data)
    else:
        yield _sized(header, size)
        async for data in source:
            for start in range(0, len(data), chunk):  # keep every message under the limit
                yield job_service_pb2.UploadArtifactRequest(data=data[start : start + chunk])


async def upload(
    method: Callable[..., Any],
    header: job_service_pb2.ArtifactHeader,
    source: Source,
    chunk: int,
    timeout: float | None,
    size: int | None = None,
) -> artifact_pb2.Artifact:
    """One UploadArtifact call; an error reading `source` is raised as itself, and the
    stored artifact of that name (if any) is left as it was.

    Letting the request iterator raise would make grpc.aio cancel the call: the caller
    saw asyncio.CancelledError (not caught by `except Exception`, and read as its own
    cancellation), and the service may see the cancel as the end of the stream and
    store the part it got, replacing the artifact (it did on MongoDB). The protocol has
    no abort message; a second header is one the service refuses, dropping the upload.
    """
    failed: list[Exception] = []

    async def messages() -> AsyncIterator[job_service_pb2.UploadArtifactRequest]:
        sent = False
        try:
            async for message in upload_messages(header, source, chunk, size):
                yield message
                sent = True
        except Exception as exc:
            failed.append(exc)
            if not sent:  # the source failed before the header (a file that won't open)
                yield job_service_pb2.UploadArtifactRequest(header=header)
            yield job_service_pb2.UploadArtifactRequest(header=header)  # refused: aborts

    try:
        result: artifact_pb2.Artifact = await method(messages(), timeout=timeout)
    except (asyncio.CancelledError, grpc.aio.AioRpcError):
        task = asyncio.current_task()
        if failed and (task is None or not task.cancelling()):
            raise failed[0] from None
        raise
    return result


class ArtifactStream:
    """One artifact's content: `async for chunk in stream`, or `await stream.save(path)`.

    `artifact` (its metadata) is set once the first message has arrived. Iterating
    retries UNAVAILABLE, CANCELLED and ABORTED (replaced under the read) only before the
    first chunk (a read cannot resume mid-way);
    `save` starts the file over instead, so it retries at any point. Before a repeat
    it waits for the channel to connect, as the client's other calls do. `timeout`
    bounds each read (an iteration or a `save`) as a whole, its repeats included.
    """

    def __init__(
        self,
        open_call: Callable[[float | None], Any],
        policy: RetryPolicy,
        stub: Callable[[], object] = lambda: None,
        sleep: Sleep = asyncio.sleep,
        ready: Ready | None = None,
        ready_budget: float = 0.0,
        timeout: float | None = None,
    ) -> None:
        self.artifact: artifact_pb2.Artifact | None = None
        self._open_call = open_call  # takes the seconds left of the read
        self._policy = policy
        self._stub = stub  # raises UsageError once the client is closed
        self._sleep = sleep  # the backoff, which the client's close() ends
        self._ready = ready
        self._ready_budget = ready_budget  # what is left of it for this read
        self._timeout = timeout

    def _deadline(self) -> float | None:
        """When a read starting now must be done (loop time), or None."""
        if self._timeout is None:
            return None
        return asyncio.get_running_loop().time() + self._timeout

    async def _backoff(self, attempt: int, deadline: float | None, error: JobwireError) -> None:
        """The wait before attempt `attempt + 1`: the policy's backoff, then for the
        channel to connect (at most the reconnect budget over the whole read). gRPC fails
        a call at once while its connection backs off (up to 2 s by default), longer
        than the retries' backoff: a read just after the service came back failed
        UNAVAILABLE while get_job on the same client worked.

        Raises `error` (the last attempt's) when the deadline leaves no time for the
        backoff, or passes while the channel is still down: each attempt had a fresh
        deadline, so `timeout=1` could take 20 attempts' worth."""
        loop = asyncio.get_running_loop()
        delay = self._policy.backoff.delay(attempt)
        if deadline is not None and loop.time() + delay >= deadline:
            raise error
        await self._sleep(delay)
        if self._ready is not None and self._ready_budget > 0:
            began = loop.time()
            wait = (
                self._ready_budget
                if deadline is None
                else min(self._ready_budget, deadline - began)
            )
            if not await self._ready(wait) and deadline is not None and loop.time() >= deadline:
                raise error  # still down: what it was, not a deadline
            self._ready_budget -= loop.time() - began

    @staticmethod
    def _left(deadline: float | None) -> float | None:
        if deadline is None:
            return None
        return max(0.0, deadline - asyncio.get_running_loop().time())

    def __aiter__(self) -> AsyncGenerator[bytes, None]:
        return self._chunks()

    async def _chunks(
        self, retry: bool = True, deadline: float | None = None
    ) -> AsyncGenerator[bytes, None]:
        attempts = self._policy.attempts if retry else 1
        if retry:
            deadline = self._deadline()
        attempt = 0
        while True:
            call = self._open_call(self._left(deadline))
            started = False
            try:
                async for reply in call:
                    if reply.HasField("artifact"):
                        self.artifact = reply.artifact
                        continue
                    started = True
                    yield reply.data
                return
            except grpc.aio.AioRpcError as err:
                attempt += 1
                error = translate(err)
                if started or err.code() not in READ_RETRYABLE or attempt >= attempts:
                    raise error from None
            except asyncio.CancelledError:
                say_if_closed(self._stub)
                raise
            finally:
                call.cancel()
            await self._backoff(attempt - 1, deadline, error)

    async def save(self, path: str | os.PathLike[str]) -> artifact_pb2.Artifact:
        """Writes the content to `path` (replacing it); returns the artifact's metadata."""
        target = Path(path)
        partial = target.with_name(target.name + ".partial")
        deadline = self._deadline()
        attempt = 0
        try:
            while True:
                try:
                    with open(partial, "wb") as f:  # noqa: ASYNC230 - writes go to a thread
                        await self._write_all(f, deadline)
                    break
                except JobwireError as err:
                    attempt += 1
                    if err.code not in READ_RETRYABLE or attempt >= self._policy.attempts:
                        raise
                    error = err
                await self._backoff(attempt - 1, deadline, error)
            partial.replace(target)
        except BaseException:  # failed or cancelled: no partial file is left behind
            partial.unlink(missing_ok=True)
            raise
        assert self.artifact is not None
        return self.artifact

    async def _write_all(self, f: IO[bytes], deadline: float | None) -> None:
        # One attempt per pass: save() itself starts the file over on UNAVAILABLE (a
        # retry inside as well made attempts x attempts calls).
        async for data in self._chunks(retry=False, deadline=deadline):
            await asyncio.to_thread(f.write, data)
