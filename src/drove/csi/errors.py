"""CSI errors: a refusal with its gRPC code, and the manager's HTTP refusals mapped to codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from drove.cli.client import ManagerError

log = logging.getLogger("drove.csi")

F = TypeVar("F", bound=Callable[..., Any])

# HTTP status of a refused manager call -> the gRPC code the CSI spec gives that case.
HTTP_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
              409: grpc.StatusCode.FAILED_PRECONDITION,
              422: grpc.StatusCode.INVALID_ARGUMENT, 503: grpc.StatusCode.UNAVAILABLE}


class CsiError(Exception):
    """A refused call: ``code`` is the gRPC status the spec asks for, the message says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def invalid(message: str) -> CsiError:
    """INVALID_ARGUMENT with ``message``."""
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> CsiError:
    """NOT_FOUND with ``message``."""
    return CsiError(grpc.StatusCode.NOT_FOUND, message)


def precondition(message: str) -> CsiError:
    """FAILED_PRECONDITION with ``message``."""
    return CsiError(grpc.StatusCode.FAILED_PRECONDITION, message)


def from_manager(exc: ManagerError) -> CsiError:
    """The CsiError for a manager's refusal (no answer at all: UNAVAILABLE)."""
    code = (grpc.StatusCode.UNAVAILABLE if exc.status is None
            else HTTP_CODES.get(exc.status, grpc.StatusCode.INTERNAL))
    return CsiError(code, str(exc))


def handler(method: F) -> F:
    """Wrap an RPC method ``(self, request, context)``: a CsiError or ManagerError aborts the
    call with its code; anything else is INTERNAL with its message (and logged)."""

    @functools.wraps(method)
    def call(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except CsiError as exc:
            err = exc
        except ManagerError as exc:
            err = from_manager(exc)
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            err = CsiError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        log.info("%s: %s %s", method.__name__, err.code.name, err)
        context.abort(err.code, str(err))

    return call  # type: ignore[return-value]
