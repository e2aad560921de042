"""One error tree for loragate. HTTP status codes are mapped only in ``gateway``.

Third-party errors are mapped to these at the boundary with ``raise ... from``.
"""

from __future__ import annotations


class LoragateError(Exception):
    """Base of every error loragate raises on purpose."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ConfigError(LoragateError):
    """A configuration file or value is invalid; ``key`` names where."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(f"{key}: {message}" if key else message, param=key)
        self.key = key


class MeasurementError(LoragateError):
    """Measuring a real server failed: it did not start, refused an adapter or a request."""


class InvalidRequestError(LoragateError):
    """The client's request is malformed or has an invalid field."""


class UnreadableBodyError(InvalidRequestError):
    """The request body could not be decoded off the connection."""


class AuthenticationError(LoragateError):
    """Missing or invalid credentials."""


class NotFoundError(LoragateError):
    """A model, adapter or resource does not exist (or is invisible to the caller)."""


class ConflictError(LoragateError):
    """The request conflicts with the current state (e.g. an adapter name already taken)."""


class ClientBodyTimeoutError(LoragateError):
    """The client stopped sending its request body before it was complete."""


class PayloadTooLargeError(LoragateError):
    """The request body exceeds the configured limit."""


class UnsupportedEncodingError(LoragateError):
    """The request body has a ``Content-Encoding`` the gateway does not decode."""


class ShuttingDownError(LoragateError):
    """The gateway is shutting down and cut a request its drain period did not see finish."""


class NoReplicaAvailableError(LoragateError):
    """Routing found no healthy candidate replica for the request."""


class UpstreamError(LoragateError):
    """A replica failed: refused the connection, timed out, or broke mid-response."""


class UpstreamConnectError(UpstreamError):
    """The replica refused or dropped the connection before answering."""


class UpstreamTimeoutError(UpstreamError):
    """The replica did not answer in time."""


class AdapterLoadTimeoutError(UpstreamTimeoutError):
    """A request's wait for its adapter's load on a replica ran out: the replica never got the
    request itself (sent again, it may well be served: no ``x-should-retry: false``)."""


class UpstreamProtocolError(UpstreamError):
    """The replica answered with something we cannot use (bad status, bad body)."""


class AdapterLoadError(UpstreamError):
    """Loading an adapter onto a replica through the admin API failed."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
