"""OpenAI-shaped HTTP errors: ``{"error": {"message", "type", "param", "code"}}``."""
from __future__ import annotations

from kvscope.serve.engine_api import ServeError
from kvscope.serve.protocol import ErrorInfo, ErrorResponse


class APIError(Exception):
    """An error response: ``param`` names the request field at fault, when one is."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


def bad_request(message: str, param: str | None) -> APIError:
    return APIError(400, message, param)


def from_serve_error(error: ServeError, param: str | None = None) -> APIError:
    """``param``: the field a rejection is blamed on (the prompt's), unused for server-side failures."""
    return APIError(error.status, str(error), param if error.status == 400 else None)
