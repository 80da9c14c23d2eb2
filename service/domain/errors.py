"""Domain errors carry a canonical status code; the servicer maps them to gRPC."""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """The google.rpc.Code values the domain raises (names match grpc.StatusCode)."""

    OK = 0
    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class DomainError(Exception):
    """A rule was broken; `message` names the field or the rule."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StorageUnavailable(DomainError):
    """The store could not be reached or did not acknowledge in time."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.UNAVAILABLE, message)


class StorageFailure(DomainError):
    """The store's server refused an operation for a reason a retry does not mend (one
    it does not implement, an unexpected error code): a fault to fix, not a moment's."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.INTERNAL, message)


def invalid(message: str) -> DomainError:
    return DomainError(Code.INVALID_ARGUMENT, message)


def not_found(job_id: str) -> DomainError:
    return DomainError(Code.NOT_FOUND, f"job {job_id!r} not found")
