"""A typed Python client for the fedbrain operator API (httpx).

    with ApiClient("http://127.0.0.1:8080", key) as api:
        job = api.submit({"component": "sensing", "base_model": "iot", "task": "normalizer"})
        for event in api.events(job["job_id"]):
            ...

Errors are :class:`ApiError` with the HTTP status, the server's message and, for invalid
forms (422), every problem with its field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeAlias, cast

import httpx

__all__ = ["ApiClient", "ApiError", "FieldError", "ServerEvent"]

Json: TypeAlias = dict[str, Any]


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


class ApiError(Exception):
    """The API refused a request (status >= 400) or could not be reached (status 0)."""

    def __init__(self, status: int, detail: str, errors: tuple[FieldError, ...] = ()) -> None:
        self.status = status
        self.detail = detail
        self.errors = errors
        lines = [f"HTTP {status}: {detail}" if status else detail]
        lines += [f"- {e.field}: {e.message}" for e in errors]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class ServerEvent:
    """One server-sent event: ``event`` is progress, status or end."""

    event: str
    data: Json = field(default_factory=dict)
    id: str | None = None


class ApiClient:
    """The whole API; ``key`` goes in the Authorization header, never in a URL."""

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(0, f"cannot reach {self._http.base_url}: {exc}") from None
        if response.status_code >= 400:
            raise _error(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # ------------------------------------------------------------------ endpoints

    def whoami(self) -> Json:
        return cast(Json, self._json("GET", "/api/v1/whoami"))

    def catalog(self) -> list[Json]:
        return cast(list[Json], self._json("GET", "/api/v1/catalog"))

    def resolve(self, form: Mapping[str, object]) -> Json:
        return cast(Json, self._json("POST", "/api/v1/jobs/resolve", json=dict(form)))

    def submit(self, form: Mapping[str, object]) -> Json:
        return cast(Json, self._json("POST", "/api/v1/jobs", json=dict(form)))

    def jobs(self, *, limit: int = 100, offset: int = 0) -> list[Json]:
        params = {"limit": limit, "offset": offset}
        return cast(list[Json], self._json("GET", "/api/v1/jobs", params=params))

    def job(self, job_id: str) -> Json:
        return cast(Json, self._json("GET", f"/api/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> Json:
        return cast(Json, self._json("POST", f"/api/v1/jobs/{job_id}/cancel"))

    def events(self, job_id: str, *, last_event_id: str | None = None) -> Iterator[ServerEvent]:
        """Follow a job's server-sent events until its ``end`` event."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        try:
            with self._http.stream(
                "GET", f"/api/v1/jobs/{job_id}/events", headers=headers, timeout=None
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                yield from _parse_sse(response.iter_lines())
        except httpx.HTTPError as exc:
            raise ApiError(0, f"the event stream broke: {exc}") from None

    def runs(self, *, limit: int = 100, offset: int = 0, status: str | None = None) -> Json:
        params: dict[str, object] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        return cast(Json, self._json("GET", "/api/v1/runs", params=params))

    def run(self, run_id: str) -> Json:
        return cast(Json, self._json("GET", f"/api/v1/runs/{run_id}"))

    def rounds(self, run_id: str, *, after: int = 0) -> list[Json]:
        params = {"after": after}
        return cast(list[Json], self._json("GET", f"/api/v1/runs/{run_id}/rounds", params=params))

    def download_bundle(self, run_id: str, path: Path) -> Path:
        response = self._request("GET", f"/api/v1/runs/{run_id}/bundle")
        path.write_bytes(response.content)
        return path

    def manifest(self, run_id: str) -> Json:
        return cast(Json, self._json("GET", f"/api/v1/runs/{run_id}/bundle/manifest"))

    def verification(self, run_id: str) -> Json:
        return cast(Json, self._json("GET", f"/api/v1/runs/{run_id}/bundle/verification"))

    def trusted_keys(self) -> bytes:
        return self._request("GET", "/api/v1/trusted-keys").content

    def keys(self) -> list[Json]:
        return cast(list[Json], self._json("GET", "/api/v1/keys"))

    def create_key(self, *, name: str, role: str) -> Json:
        return cast(Json, self._json("POST", "/api/v1/keys", json={"name": name, "role": role}))

    def rotate_key(self, key_id: str) -> Json:
        return cast(Json, self._json("POST", f"/api/v1/keys/{key_id}/rotate"))

    def revoke_key(self, key_id: str) -> Json:
        return cast(Json, self._json("DELETE", f"/api/v1/keys/{key_id}"))

    def audit(self, *, after: int = 0, limit: int = 100) -> list[Json]:
        params = {"after": after, "limit": limit}
        return cast(list[Json], self._json("GET", "/api/v1/audit", params=params))

    def audit_verify(self) -> Json:
        return cast(Json, self._json("GET", "/api/v1/audit/verify"))

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text


def _error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        return ApiError(response.status_code, response.text[:200] or response.reason_phrase)
    detail = str(body.get("detail", response.reason_phrase)) if isinstance(body, dict) else ""
    raw = body.get("errors", []) if isinstance(body, dict) else []
    errors = tuple(
        FieldError(str(e.get("field", "")), str(e.get("message", "")))
        for e in raw
        if isinstance(e, dict)
    )
    return ApiError(response.status_code, detail, errors)


def _parse_sse(lines: Iterator[str]) -> Iterator[ServerEvent]:
    event: str = "message"
    data: list[str] = []
    event_id: str | None = None
    for line in lines:
        if not line:
            if data:
                try:
                    payload = json.loads("\n".join(data))
                except ValueError:
                    payload = {}
                yield ServerEvent(event, payload if isinstance(payload, dict) else {}, event_id)
                if event == "end":
                    return
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value
