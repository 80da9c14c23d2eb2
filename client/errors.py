"""The client's exceptions: one small hierarchy carrying the gRPC code and message.

Callers catch `JobwireError` (or one subclass) instead of `grpc.aio.AioRpcError`;
`code` keeps the canonical status for anything the subclasses do not name.
"""

from __future__ import annotations

import grpc


class JobwireError(Exception):
    """A call failed; `code` is the gRPC status code, `message` the service's words."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgument(JobwireError):
    """The request named a bad field (the message names it)."""


class ArgumentError(InvalidArgument, ValueError):
    """An argument the client refuses before sending anything (an unknown kind name, a
    duration that is not one): INVALID_ARGUMENT, as the service would answer. Also a
    ValueError, what these raised before, so code that caught that keeps working."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of the wrong type (`labels={"n": 1}`, a job id that is not a str),
    named, with nothing sent. Also a TypeError, what protobuf raised before (naming no
    argument: "bad argument type for built-in operation")."""


class NotFound(JobwireError):
    """The job (or artifact) does not exist."""


class AlreadyExists(JobwireError):
    """CreateJob with a job id that is taken."""


class FailedPrecondition(JobwireError):
    """The job's state forbids it (e.g. cancelling a finished job)."""


class Unauthenticated(JobwireError):
    """The bearer token or the job's callback token is missing or wrong."""


class PermissionDenied(JobwireError):
    """The caller is known but not allowed."""


class Unavailable(JobwireError):
    """The service could not be reached (after the client's own retries, if any)."""


class DeadlineExceeded(JobwireError):
    """The call's deadline passed before the service answered."""


_BY_CODE: dict[grpc.StatusCode, type[JobwireError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def error_for(code: grpc.StatusCode, message: str) -> JobwireError:
    """The exception class that names `code` (JobwireError for the rest)."""
    return _BY_CODE.get(code, JobwireError)(code, message)


def translate(err: grpc.aio.AioRpcError) -> JobwireError:
    return error_for(err.code(), err.details() or "")


class ClientConfigError(ValueError):
    """The client's own settings are unusable (e.g. a TLS file cannot be read)."""
