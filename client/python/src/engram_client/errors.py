"""Typed errors for failed Engram calls.

Every failed RPC raises an `EngramError` subclass chosen by its gRPC status
code, carrying the code and the server's message verbatim:

    try:
        client.get_bank("missing")
    except engram_client.NotFound as e:
        print(e.code, e.message)   # StatusCode.NOT_FOUND, the server's text

Arguments the client cannot encode (a 3-D array, an unknown enum name, an id
outside uint64) raise ValueError or TypeError before any call is made.
"""
from __future__ import annotations

from typing import Dict, Optional, Type

import grpc

__all__ = [
    "EngramError", "Cancelled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
    "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted",
    "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated",
    "error_from_rpc",
]


class EngramError(Exception):
    """A call that ended with a non-OK gRPC status.

    Attributes:
      code: the grpc.StatusCode of the answer.
      message: the status message as the server (or gRPC) wrote it.
    """

    #: The status code a subclass stands for (UNKNOWN for the base class).
    grpc_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None) -> None:
        """Builds an error with `message` and `code` (default: the class's code)."""
        self.code: grpc.StatusCode = code if code is not None else self.grpc_code
        self.message: str = message
        super().__init__(message)

    def __str__(self) -> str:
        """Returns "CODE_NAME: message"."""
        return "%s: %s" % (self.code.name, self.message)


class Cancelled(EngramError):
    """CANCELLED: the call was cancelled (usually by the caller)."""
    grpc_code = grpc.StatusCode.CANCELLED


class Unknown(EngramError):
    """UNKNOWN."""
    grpc_code = grpc.StatusCode.UNKNOWN


class InvalidArgument(EngramError):
    """INVALID_ARGUMENT: a bad name, dimension, enum value, energy or shape."""
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(EngramError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's timeout (or queue_timeout_ms) passed."""
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(EngramError):
    """NOT_FOUND: the bank or a pattern id does not exist."""
    grpc_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(EngramError):
    """ALREADY_EXISTS: the bank name, pattern id or backup file is taken."""
    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(EngramError):
    """PERMISSION_DENIED."""
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(EngramError):
    """RESOURCE_EXHAUSTED: a full queue, memory budget or message limit."""
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(EngramError):
    """FAILED_PRECONDITION: e.g. an energy family the bank's kind does not take."""
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(EngramError):
    """ABORTED."""
    grpc_code = grpc.StatusCode.ABORTED


class OutOfRange(EngramError):
    """OUT_OF_RANGE."""
    grpc_code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(EngramError):
    """UNIMPLEMENTED: the server does not serve this method."""
    grpc_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(EngramError):
    """INTERNAL."""
    grpc_code = grpc.StatusCode.INTERNAL


class Unavailable(EngramError, ConnectionError):
    """UNAVAILABLE: no server answered; raised after the client's retries."""
    grpc_code = grpc.StatusCode.UNAVAILABLE


class DataLoss(EngramError):
    """DATA_LOSS."""
    grpc_code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(EngramError):
    """UNAUTHENTICATED: a missing or wrong bearer token."""
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: Dict[grpc.StatusCode, Type[EngramError]] = {
    cls.grpc_code: cls
    for cls in (Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
                PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
                Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated)
}


def error_from_rpc(error: grpc.RpcError) -> EngramError:
    """Returns the EngramError subclass instance for a failed gRPC call.

    `error` must be a grpc.RpcError that is also a grpc.Call (what sync and
    grpc.aio stubs raise); the code and details are copied unchanged.
    """
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    cls = _BY_CODE.get(code, EngramError)
    return cls(details or "", code)
