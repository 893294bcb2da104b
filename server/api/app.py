"""``fedbrain serve``: the operator REST API (FastAPI) and the web dashboard, one app.

Every route under ``/api/v1`` needs an API key in a header (``Authorization: Bearer <key>``
or ``X-API-Key``) and the permission its table entry names (:data:`ROUTE_PERMISSIONS`,
docs/operator-api.md). Responses never carry stack traces: validation problems are 422 with
every problem and its field, unknown things 404, unexpected errors 500 with an error id that
the server log (with the traceback) also shows. Bodies larger than ``max_body_bytes`` are
refused with 413 before they are read whole. CORS is closed unless origins are configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from manifests import catalog
from manifests.jobspec import JobSpec, JobSpecError
from manifests.keys import TrustedKeys
from manifests.verify import BundleVerificationError, verify_bundle
from server.api.audit import Action, AuditLog
from server.api.auth import ApiKey, AuthError, KeyStore, Permission, Role
from server.api.metrics import CONTENT_TYPE_LATEST, Metrics
from server.api.store import ApiStore, JobRow
from server.api.views import (
    epsilon_budget,
    form_errors,
    job_json,
    json_safe,
    num_rounds,
    resolved,
    round_view,
    run_row,
)
from server.api.worker import EVENTS_FILE, JobState, Worker, WorkerSettings, read_events
from server.ledger import Ledger, LedgerError, RunNotFoundError

__all__ = ["ROUTE_PERMISSIONS", "ApiSettings", "create_app"]

logger = logging.getLogger("fedbrain.api")

API: Final = "/api/v1"
WEB_DIR: Final = Path(__file__).resolve().parent.parent / "web"
_MANIFEST_LIMIT: Final = 4 << 20

ROUTE_PERMISSIONS: Final[dict[tuple[str, str], Permission]] = {
    ("GET", f"{API}/whoami"): Permission.READ,
    ("GET", f"{API}/catalog"): Permission.READ,
    ("POST", f"{API}/jobs/resolve"): Permission.READ,
    ("POST", f"{API}/jobs"): Permission.SUBMIT,
    ("GET", f"{API}/jobs"): Permission.READ,
    ("GET", f"{API}/jobs/{{job_id}}"): Permission.READ,
    ("POST", f"{API}/jobs/{{job_id}}/cancel"): Permission.CANCEL,
    ("GET", f"{API}/jobs/{{job_id}}/events"): Permission.READ,
    ("GET", f"{API}/runs"): Permission.READ,
    ("GET", f"{API}/runs/{{run_id}}"): Permission.READ,
    ("GET", f"{API}/runs/{{run_id}}/rounds"): Permission.READ,
    ("GET", f"{API}/runs/{{run_id}}/bundle"): Permission.READ,
    ("GET", f"{API}/runs/{{run_id}}/bundle/manifest"): Permission.READ,
    ("GET", f"{API}/runs/{{run_id}}/bundle/verification"): Permission.READ,
    ("GET", f"{API}/trusted-keys"): Permission.READ,
    ("GET", f"{API}/keys"): Permission.MANAGE_KEYS,
    ("POST", f"{API}/keys"): Permission.MANAGE_KEYS,
    ("POST", f"{API}/keys/{{key_id}}/rotate"): Permission.MANAGE_KEYS,
    ("DELETE", f"{API}/keys/{{key_id}}"): Permission.MANAGE_KEYS,
    ("GET", f"{API}/audit"): Permission.READ_AUDIT,
    ("GET", f"{API}/audit/verify"): Permission.READ_AUDIT,
    ("GET", "/metrics"): Permission.READ,
}
"""Every authenticated route and the permission it needs (tests walk this table)."""


@dataclass(frozen=True)
class ApiSettings:
    """``database_url``: the ledger and the API's tables. ``data_dir``: jobs' folders and the
    signing keys. ``cors_origins``: origins allowed to call the API from a browser (none by
    default). ``start_worker``: run submitted jobs (tests of the read side turn it off)."""

    database_url: str
    data_dir: Path
    max_body_bytes: int = 64 * 1024
    cors_origins: tuple[str, ...] = ()
    start_worker: bool = True
    worker: Mapping[str, Any] = field(default_factory=dict)
    """Extra :class:`server.api.worker.WorkerSettings` fields (command, template, ...)."""


@dataclass
class _State:
    settings: ApiSettings
    store: ApiStore
    ledger: Ledger
    keys: KeyStore
    audit: AuditLog
    metrics: Metrics
    worker: Worker


# ----------------------------------------------------------------------------- helpers


def _problem(status: int, detail: str, **extra: object) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status)


async def _json_object(request: Request) -> dict[str, object]:
    body = await request.body()
    try:
        value = json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(422, f"the body must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise HTTPException(422, "the body must be a JSON object of learning-form fields")
    return value


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _route_template(request: Request) -> str:
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is Match.FULL:
            return str(getattr(route, "path", "other"))
    return "unmatched"


def _bearer(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return None


def authenticated(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> ApiKey:
    key = _bearer(authorization, x_api_key)
    challenge = {"WWW-Authenticate": 'Bearer realm="fedbrain"'}
    if key is None:
        raise HTTPException(401, "an API key is required (Authorization: Bearer)", challenge)
    try:
        api_key = _state(request).keys.authenticate(key)
    except AuthError:
        raise HTTPException(401, "invalid or revoked API key", challenge) from None
    matched = request.scope.get("route")
    route = str(getattr(matched, "path", ""))
    permission = ROUTE_PERMISSIONS.get((request.method, route), Permission.MANAGE_KEYS)
    if not api_key.role.allows(permission):
        raise HTTPException(
            403, f"role {api_key.role} may not {permission} (needs {_least(permission)})"
        )
    return api_key


Caller = Annotated[ApiKey, Depends(authenticated)]


def _state(request: Request) -> _State:
    return request.app.state.fedbrain  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- app


def create_app(settings: ApiSettings) -> FastAPI:
    """The API + dashboard app; its worker starts and stops with the app's lifespan."""
    store = ApiStore(settings.database_url)
    ledger = Ledger(settings.database_url)
    audit = AuditLog(store)
    metrics = Metrics()
    worker = Worker(
        WorkerSettings(
            data_dir=settings.data_dir, database_url=settings.database_url, **settings.worker
        ),
        store,
        ledger,
        audit,
        metrics,
    )
    state = _State(settings, store, ledger, KeyStore(store), audit, metrics, worker)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.start_worker:
            worker.start()
        try:
            yield
        finally:
            if settings.start_worker:
                await asyncio.to_thread(worker.stop)
            ledger.close()
            store.close()

    app = FastAPI(
        title="fedbrain operator API",
        version="1",
        description="Review and steer federated rounds: jobs, runs, rounds, bundles, keys, "
        "audit. Authenticate with `Authorization: Bearer <API key>` (or `X-API-Key`).",
        lifespan=lifespan,
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.fedbrain = state
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "Last-Event-ID"],
            allow_credentials=False,
        )

    @app.middleware("http")
    async def guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        route = _route_template(request)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            response: Response = _problem(
                413, f"the request body is larger than {settings.max_body_bytes} bytes"
            )
        elif (
            length is None
            and request.method in ("POST", "PUT", "PATCH")
            and ("chunked" in request.headers.get("transfer-encoding", ""))
        ):
            response = _problem(411, "send a Content-Length header (chunked bodies are refused)")
        else:
            try:
                response = await call_next(request)
            except Exception:
                error_id = uuid.uuid4().hex[:12]
                logger.exception("Unhandled error %s on %s %s", error_id, request.method, route)
                response = _problem(500, "internal error", error_id=error_id)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        )
        if request.url.path.startswith(API):
            response.headers.setdefault("Cache-Control", "no-store")
        metrics.observe_request(
            route, request.method, response.status_code, time.perf_counter() - started
        )
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "field": ".".join(
                    str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")
                ),
                "message": str(err.get("msg", "invalid")),
            }
            for err in exc.errors()
        ]
        return _problem(422, "invalid request", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = _problem(exc.status_code, str(exc.detail))
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    @app.exception_handler(LedgerError)
    async def storage_error(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, RunNotFoundError):
            return _problem(404, f"no run {exc.run_id!r}")
        error_id = uuid.uuid4().hex[:12]
        logger.error("Database error %s: %s", error_id, exc)
        return _problem(503, "the database is unavailable", error_id=error_id)

    # ------------------------------------------------------------------ auth

    # ------------------------------------------------------------------ public

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics_route(caller: Caller) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ catalog, form

    @app.get(f"{API}/whoami", summary="The caller's key (id, name, role)")
    def whoami(caller: Caller) -> dict[str, object]:
        return caller.to_json()

    @app.get(f"{API}/catalog", summary="Every artifact of the catalog; which are trainable")
    def catalog_route(caller: Caller) -> list[dict[str, object]]:
        return [
            {
                "id": e.id,
                "node_type": e.node_type.value,
                "component": e.component.value,
                "base_model": e.base_model,
                "task": e.task,
                "embedding_dim": e.embedding_dim,
                "trainable": e.trainable,
                "training_forms": [
                    {"component": f.component.value, "base_model": f.base_model, "task": f.task}
                    for f in e.training_forms()
                ],
                "description": e.description,
            }
            for e in catalog.entries()
        ]

    form_body: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "description": "Learning-form fields (manifests.jobspec.JobSpec); "
                        "tables federation/dp/secagg nested or as dotted keys.",
                    }
                }
            },
        }
    }

    def _spec(values: dict[str, object]) -> JobSpec:
        try:
            return JobSpec.from_mapping(values)
        except JobSpecError as exc:
            raise _FormError(exc.problems) from None

    @app.exception_handler(_FormError)
    async def form_error(request: Request, exc: _FormError) -> JSONResponse:
        errors = form_errors(exc.problems)
        return _problem(422, f"invalid job ({len(errors)} problem(s))", errors=errors)

    @app.post(
        f"{API}/jobs/resolve",
        summary="Resolve a learning form: artifact name, manifest fields, config hash",
        openapi_extra=form_body,
        responses={422: {"description": "every problem of the form, with field names"}},
    )
    async def resolve(request: Request, caller: Caller) -> dict[str, Any]:
        spec = _spec(await _json_object(request))
        return resolved(spec)

    @app.post(
        f"{API}/jobs",
        status_code=202,
        summary="Submit a job (queued; runs on the Simulation Engine)",
        openapi_extra=form_body,
    )
    async def submit(request: Request, caller: Caller) -> dict[str, Any]:
        spec = _spec(await _json_object(request))
        row = await asyncio.to_thread(worker.submit, spec, by=caller.actor)
        await asyncio.to_thread(
            audit.append,
            actor=caller.actor,
            action=Action.JOB_SUBMITTED,
            target=row.job_id,
            details={
                "artifact_name": row.artifact_name,
                "training_config_hash": resolved(spec)["training_config_hash"],
                "privacy_level": spec.privacy_level.value,
            },
        )
        return job_json(row)

    # ------------------------------------------------------------------ jobs

    def _job(job_id: str) -> JobRow:
        with store.session() as session:
            row = session.get(JobRow, job_id)
        if row is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return row

    @app.get(f"{API}/jobs", summary="Submitted jobs, newest first")
    def jobs(
        caller: Caller,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[dict[str, Any]]:
        with store.session() as session:
            rows = session.scalars(
                select(JobRow)
                .order_by(JobRow.submitted_at.desc(), JobRow.job_id)
                .offset(offset)
                .limit(limit)
            ).all()
        return [job_json(r) for r in rows]

    @app.get(f"{API}/jobs/{{job_id}}", summary="A job: status, run id, exit code")
    def job(job_id: str, caller: Caller) -> dict[str, Any]:
        return job_json(_job(job_id))

    @app.post(f"{API}/jobs/{{job_id}}/cancel", status_code=202, summary="Cancel a job")
    async def cancel(job_id: str, caller: Caller) -> dict[str, Any]:
        _job(job_id)
        before = await asyncio.to_thread(worker.request_cancel, job_id, by=caller.actor)
        row = _job(job_id)
        if before.final and not row.cancel_requested:
            raise HTTPException(409, f"job {job_id} already ended as {before}")
        await asyncio.to_thread(
            audit.append, actor=caller.actor, action=Action.JOB_CANCELLED, target=job_id
        )
        return job_json(row)

    @app.get(
        f"{API}/jobs/{{job_id}}/events",
        summary="Live progress as server-sent events (progress, status, end)",
        response_class=StreamingResponse,
    )
    async def job_events(
        job_id: str,
        caller: Caller,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> StreamingResponse:
        row = _job(job_id)
        offset = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
        path = Path(row.out_dir) / EVENTS_FILE
        return StreamingResponse(
            _stream(job_id, path, offset),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def _stream(job_id: str, path: Path, offset: int) -> AsyncIterator[bytes]:
        last_status = ""
        idle = 0.0
        while True:
            events, offset = await asyncio.to_thread(read_events, path, offset=offset)
            for event in events:
                data = json.dumps(json_safe(event), allow_nan=False)
                yield f"id: {offset}\nevent: progress\ndata: {data}\n\n".encode()
            row = await asyncio.to_thread(_job, job_id)
            if row.status != last_status or events:
                last_status = row.status
                data = json.dumps(job_json(row), allow_nan=False)
                yield f"event: status\ndata: {data}\n\n".encode()
            if JobState(row.status).final and not events:
                yield b"event: end\ndata: {}\n\n"
                return
            await asyncio.sleep(0.3)
            idle += 0.3
            if idle >= 15:
                idle = 0.0
                yield b": keep-alive\n\n"

    # ------------------------------------------------------------------ runs

    def _job_of_run(run_id: str) -> JobRow | None:
        with store.session() as session:
            return session.scalar(select(JobRow).where(JobRow.run_id == run_id).limit(1))

    @app.get(f"{API}/runs", summary="Every run in the ledger, newest first")
    def runs(
        caller: Caller,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
        status: Annotated[
            str | None, Query(pattern="^(running|completed|rejected|failed|aborted)$")
        ] = None,
    ) -> dict[str, Any]:
        page = ledger.list_runs(limit=limit, offset=offset, status=status)
        return {
            "total": ledger.count_runs(status=status),
            "runs": [json_safe(run_row(r.to_json())) for r in page],
        }

    @app.get(f"{API}/runs/{{run_id}}", summary="A run: verdict, privacy, refused nodes, job")
    def run(run_id: str, caller: Caller) -> dict[str, Any]:
        summary = ledger.get_run(run_id)
        refused = ledger.refused_nodes(run_id)
        job_row = _job_of_run(run_id)
        document = run_row(summary.to_json())
        document["refused_nodes"] = [n.to_json() for n in refused]
        document["job_id"] = None if job_row is None else job_row.job_id
        document["num_rounds"] = num_rounds(summary.job)
        document["epsilon_budget"] = epsilon_budget(summary.job)
        document["has_bundle"] = bool(summary.bundle_path and Path(summary.bundle_path).is_file())
        return json_safe(document)  # type: ignore[return-value]

    @app.get(f"{API}/runs/{{run_id}}/rounds", summary="The run's rounds with their metrics")
    def rounds(
        run_id: str,
        caller: Caller,
        after: Annotated[int, Query(ge=0, description="Only rounds after this one")] = 0,
    ) -> list[dict[str, Any]]:
        return [round_view(r) for r in ledger.rounds(run_id, after=after)]

    def _bundle(run_id: str) -> Path:
        summary = ledger.get_run(run_id)
        if not summary.bundle_path:
            raise HTTPException(404, f"run {run_id} has no bundle (status {summary.status})")
        path = Path(summary.bundle_path)
        if path.suffix != ".zip" or not path.is_file():
            raise HTTPException(404, f"the bundle of run {run_id} is no longer on this server")
        return path

    @app.get(
        f"{API}/runs/{{run_id}}/bundle",
        summary="Download the signed bundle (ZIP)",
        response_class=FileResponse,
    )
    def bundle(run_id: str, caller: Caller) -> FileResponse:
        path = _bundle(run_id)
        return FileResponse(path, media_type="application/zip", filename=path.name)

    @app.get(f"{API}/runs/{{run_id}}/bundle/manifest", summary="The bundle's manifest")
    def manifest(run_id: str, caller: Caller) -> dict[str, Any]:
        path = _bundle(run_id)
        try:
            with zipfile.ZipFile(path) as archive:
                info = archive.getinfo("artifact_manifest.json")
                if info.file_size > _MANIFEST_LIMIT:
                    raise HTTPException(422, "the manifest is too large to show")
                document = json.loads(archive.read(info))
        except (KeyError, zipfile.BadZipFile, ValueError):
            raise HTTPException(422, "the bundle holds no readable manifest") from None
        return json_safe(document)  # type: ignore[return-value]

    @app.get(
        f"{API}/runs/{{run_id}}/bundle/verification",
        summary="Verify the bundle against the server's trusted keys",
    )
    def verification(run_id: str, caller: Caller) -> dict[str, Any]:
        path = _bundle(run_id)
        try:
            trusted = TrustedKeys.load(worker.settings.trusted_keys)
            result = verify_bundle(path, trusted, now=datetime.now(UTC))
        except BundleVerificationError as exc:
            return {"verified": False, "error": f"{type(exc).__name__}: {exc}"}
        except (OSError, ValueError) as exc:
            return {"verified": False, "error": f"cannot read the trusted keys: {exc}"}
        return {
            "verified": True,
            "artifact_name": result.artifact_name,
            "keyid": result.keyid,
            "subjects": [json_safe(getattr(s, "__dict__", str(s))) for s in result.subjects],
            "trusted_keys": str(worker.settings.trusted_keys.name),
        }

    @app.get(f"{API}/trusted-keys", summary="The public keys bundles are verified with")
    def trusted_keys(caller: Caller) -> Response:
        try:
            data = worker.settings.trusted_keys.read_bytes()
        except OSError:
            raise HTTPException(404, "this server has no trusted-keys file") from None
        return Response(data, media_type="application/json")

    # ------------------------------------------------------------------ keys, audit

    @app.get(f"{API}/keys", summary="API keys (never their secrets)")
    def keys(caller: Caller) -> list[dict[str, object]]:
        return [k.to_json() for k in state.keys.list()]

    @app.post(f"{API}/keys", status_code=201, summary="Create an API key (shown once)")
    async def create_key(request: Request, caller: Caller) -> dict[str, object]:
        body = await _json_object(request)
        problems = [f"{k}: is not a key setting" for k in body if k not in ("name", "role")]
        name, role = body.get("name"), body.get("role")
        if not isinstance(name, str):
            problems.append("name: is required (text)")
        if role not in [r.value for r in Role]:
            problems.append(f"role: must be one of {', '.join(r.value for r in Role)}")
        if problems:
            raise _FormError(problems)
        try:
            created, secret = state.keys.create(
                name=str(name), role=str(role), created_by=caller.actor
            )
        except ValueError as exc:
            raise _FormError([str(exc)]) from None
        audit.append(
            actor=caller.actor,
            action=Action.KEY_CREATED,
            target=created.key_id,
            details={"name": created.name, "role": created.role.value},
        )
        return {**created.to_json(), "key": secret}

    @app.post(f"{API}/keys/{{key_id}}/rotate", status_code=201, summary="Rotate an API key")
    def rotate_key(key_id: str, caller: Caller) -> dict[str, object]:
        try:
            created, secret = state.keys.rotate(key_id, by=caller.actor)
        except KeyError:
            raise HTTPException(404, f"no API key {key_id!r}") from None
        audit.append(
            actor=caller.actor,
            action=Action.KEY_ROTATED,
            target=key_id,
            details={"new_key_id": created.key_id, "role": created.role.value},
        )
        return {**created.to_json(), "key": secret, "replaces": key_id}

    @app.delete(f"{API}/keys/{{key_id}}", summary="Revoke an API key (stops working at once)")
    def revoke_key(key_id: str, caller: Caller) -> dict[str, object]:
        try:
            revoked = state.keys.revoke(key_id)
        except KeyError:
            raise HTTPException(404, f"no API key {key_id!r}") from None
        audit.append(actor=caller.actor, action=Action.KEY_REVOKED, target=key_id)
        return revoked.to_json()

    @app.get(f"{API}/audit", summary="The audit log, oldest first")
    def audit_route(
        caller: Caller,
        after: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, object]]:
        return [e.to_json() for e in audit.entries(after=after, limit=limit)]

    @app.get(f"{API}/audit/verify", summary="Verify the audit log's hash chain")
    def audit_verify(caller: Caller) -> dict[str, object]:
        result = audit.verify()
        return {
            "ok": result.ok,
            "rows": result.rows,
            "head": {"seq": result.head_seq, "hash": result.head_hash},
            "problems": list(result.problems),
        }

    # ------------------------------------------------------------------ web

    if WEB_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

        @app.get("/", include_in_schema=False)
        def index() -> FileResponse:
            return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    return app


class _FormError(Exception):
    def __init__(self, problems: tuple[str, ...] | list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


def _least(permission: Permission) -> str:
    from server.api.auth import PERMISSIONS

    return PERMISSIONS[permission].value
