"""Errors in OpenAI's format: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status."""

from __future__ import annotations

import json

from starlette.responses import Response

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          503: "service_unavailable_error"}


class APIError(Exception):
    """An error the server answers with: HTTP status, message, and OpenAI's type / param / code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")
        self.headers = headers or {}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict:
    kind = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   type: str | None = None, headers: dict[str, str] | None = None) -> Response:
    """A JSON error response. Escaped to ASCII: a message may quote client text with lone surrogates."""
    body = json.dumps(error_body(status, _one_line(message), param=param, code=code, type=type), ensure_ascii=True)
    return Response(body.encode("ascii"), status_code=status, media_type="application/json", headers=headers)


def from_api_error(e: APIError) -> Response:
    return error_response(e.status, e.message, param=e.param, code=e.code, type=e.type, headers=e.headers)


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= 2000 else line[:2000] + "..."
