"""Operator commands: ``fedbrain serve``, ``fedbrain api-keys ...``, ``fedbrain audit verify``
and ``fedbrain remote ...`` (the API client on the command line).

Exit codes (every fedbrain command but ``simulate``): 0 done; 1 a check or the operation
failed (audit chain broken, bundle not verified, job failed, server unreachable); 2 invalid
input or usage (bad option, invalid job, unreadable file, unknown run, job or key).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any, Final

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["register"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_INVALID: Final = 2
DB_ENV: Final = "FEDBRAIN_DATABASE_URL"
URL_ENV: Final = "FEDBRAIN_API_URL"
KEY_ENV: Final = "FEDBRAIN_API_KEY"

keys_app = typer.Typer(no_args_is_help=True, help="API keys of the operator API.")
audit_app = typer.Typer(no_args_is_help=True, help="The operator API's audit log.")
remote_app = typer.Typer(no_args_is_help=True, help="Use a running `fedbrain serve` over HTTP.")

DbOption = Annotated[
    str,
    typer.Option(
        "--db",
        envvar=DB_ENV,
        help="Database URL of the server (SQLAlchemy), e.g. sqlite:///runs/api/fedbrain.sqlite.",
    ),
]
UrlOption = Annotated[
    str, typer.Option("--url", envvar=URL_ENV, help="Base URL of the fedbrain API.")
]
KeyOption = Annotated[
    str,
    typer.Option(
        "--key", envvar=KEY_ENV, help="API key (better: set $FEDBRAIN_API_KEY).", show_default=False
    ),
]


def _exit(code: int, message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _sqlite_folder(db: str) -> None:
    """Create the folder of a SQLite database file (the first command may be any of them)."""
    if db.startswith("sqlite:///") and db not in ("sqlite:///", "sqlite:///:memory:"):
        Path(db.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _store(db: str) -> Any:
    from server.api.store import ApiStore
    from server.ledger import LedgerError

    _sqlite_folder(db)
    try:
        return ApiStore(db)
    except (LedgerError, ValueError) as exc:
        raise _exit(EXIT_INVALID, f"cannot open the database: {exc}") from None
    except Exception as exc:  # driver missing, bad URL, ...
        raise _exit(EXIT_INVALID, f"cannot open the database: {type(exc).__name__}") from None


# ----------------------------------------------------------------------------- serve


def serve(
    db: DbOption = "sqlite:///runs/api/fedbrain.sqlite",
    data_dir: Annotated[
        Path, typer.Option(help="Jobs' output folders and the signing keys.")
    ] = Path("runs/api"),
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8080,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(help="Allow this browser origin (repeat); none by default."),
    ] = None,
    max_body_kib: Annotated[int, typer.Option(min=1, help="Largest request body.")] = 64,
    scenario_template: Annotated[
        Path | None,
        typer.Option(help="Scenario whose settings and node groups jobs run on (TOML)."),
    ] = None,
) -> None:
    """Run the operator API and the dashboard (http://HOST:PORT/)."""
    import uvicorn

    from server.api.app import ApiSettings, create_app
    from server.ledger import LedgerError

    _sqlite_folder(db)
    worker: dict[str, object] = {}
    if scenario_template is not None:
        if not scenario_template.is_file():
            raise _exit(EXIT_INVALID, f"no scenario template at {scenario_template}")
        worker["scenario_template"] = scenario_template.resolve()
    try:
        app = create_app(
            ApiSettings(
                database_url=db,
                data_dir=data_dir.resolve(),
                cors_origins=tuple(cors_origin or ()),
                max_body_bytes=max_body_kib * 1024,
                worker=worker,
            )
        )
    except (LedgerError, OSError, ValueError) as exc:
        raise _exit(EXIT_INVALID, str(exc)) from None
    typer.echo(f"fedbrain API on http://{host}:{port}/ (docs: /api/docs)", err=True)
    # access_log off: the metrics count requests; keys are never in URLs anyway
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="info")


# ----------------------------------------------------------------------------- api-keys


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what holds the key.")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")],
    db: DbOption = "sqlite:///runs/api/fedbrain.sqlite",
) -> None:
    """Create a key and print it once (only its hash is stored)."""
    from server.api.audit import Action, AuditLog
    from server.api.auth import KeyStore

    store = _store(db)
    try:
        created, secret = KeyStore(store).create(name=name, role=role, created_by="cli")
        AuditLog(store).append(
            actor="cli",
            action=Action.KEY_CREATED,
            target=created.key_id,
            details={"name": created.name, "role": created.role.value},
        )
    except ValueError as exc:
        raise _exit(EXIT_INVALID, str(exc)) from None
    finally:
        store.close()
    typer.echo(f"created key {created.key_id} ({created.name}, {created.role}).", err=True)
    typer.echo("Store it now; it is not shown again:", err=True)
    typer.echo(secret)


@keys_app.command("list")
def keys_list(db: DbOption = "sqlite:///runs/api/fedbrain.sqlite") -> None:
    """List keys (never their secrets)."""
    from server.api.auth import KeyStore

    store = _store(db)
    try:
        keys = KeyStore(store).list()
    finally:
        store.close()
    table = Table(title=f"API keys ({len(keys)})")
    for column in ("key id", "name", "role", "created", "status"):
        table.add_column(column)
    for k in keys:
        table.add_row(
            k.key_id,
            escape(k.name),
            k.role.value,
            f"{k.created_at:%Y-%m-%d %H:%M}Z",
            "revoked" if k.revoked_at else "active",
        )
    Console(width=160).print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (as listed).")],
    db: DbOption = "sqlite:///runs/api/fedbrain.sqlite",
) -> None:
    """Revoke a key: it stops working at once."""
    from server.api.audit import Action, AuditLog
    from server.api.auth import KeyStore

    store = _store(db)
    try:
        KeyStore(store).revoke(key_id)
        AuditLog(store).append(actor="cli", action=Action.KEY_REVOKED, target=key_id)
    except KeyError:
        raise _exit(EXIT_INVALID, f"no API key {key_id!r}") from None
    finally:
        store.close()
    typer.echo(f"revoked {key_id}", err=True)


@keys_app.command("rotate")
def keys_rotate(
    key_id: Annotated[str, typer.Argument(help="The key id (as listed).")],
    db: DbOption = "sqlite:///runs/api/fedbrain.sqlite",
) -> None:
    """Revoke a key and print a new one with its name and role."""
    from server.api.audit import Action, AuditLog
    from server.api.auth import KeyStore

    store = _store(db)
    try:
        created, secret = KeyStore(store).rotate(key_id, by="cli")
        AuditLog(store).append(
            actor="cli",
            action=Action.KEY_ROTATED,
            target=key_id,
            details={"new_key_id": created.key_id, "role": created.role.value},
        )
    except KeyError:
        raise _exit(EXIT_INVALID, f"no API key {key_id!r}") from None
    finally:
        store.close()
    typer.echo(f"revoked {key_id}; new key {created.key_id} (shown once):", err=True)
    typer.echo(secret)


# ----------------------------------------------------------------------------- audit


@audit_app.command("verify")
def audit_verify(
    db: DbOption = "sqlite:///runs/api/fedbrain.sqlite",
    expect_head: Annotated[
        str | None,
        typer.Option(help="SEQ:HASH of the last row as recorded earlier (catches truncation)."),
    ] = None,
) -> None:
    """Check the audit log's hash chain; name every edited, deleted or reordered row."""
    from server.api.audit import AuditLog

    store = _store(db)
    try:
        result = AuditLog(store).verify()
    except Exception as exc:
        raise _exit(EXIT_INVALID, f"cannot read the audit log: {exc}") from None
    finally:
        store.close()
    problems = list(result.problems)
    if expect_head is not None:
        seq, _, digest = expect_head.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise _exit(EXIT_INVALID, "--expect-head must be SEQ:HASH (as this command prints)")
        if int(seq) > result.head_seq:
            problems.append(f"rows {result.head_seq + 1} to {seq}: deleted from the end")
        elif int(seq) == result.head_seq and digest != result.head_hash:
            problems.append(f"row {seq}: differs from the recorded head")
    for problem in problems:
        typer.echo(problem)
    head = f"{result.head_seq}:{result.head_hash}"
    if problems:
        typer.echo(f"audit log BROKEN: {len(problems)} problem(s) in {result.rows} rows", err=True)
        raise typer.Exit(EXIT_FAILED)
    typer.echo(f"audit log intact: {result.rows} rows, head {head}")


# ----------------------------------------------------------------------------- remote


def _client(url: str, key: str) -> Any:
    from server.api_client import ApiClient

    if not key:
        raise _exit(EXIT_INVALID, f"give an API key with --key or ${KEY_ENV}")
    return ApiClient(url, key)


def _api_exit(exc: Any) -> typer.Exit:
    status = int(exc.status)
    code = EXIT_INVALID if status in (400, 404, 409, 413, 422) else EXIT_FAILED
    return _exit(code, str(exc))


@remote_app.command("submit")
def remote_submit(
    job: Annotated[Path, typer.Argument(help="Job file (.toml or .json, the learning form).")],
    url: UrlOption = "http://127.0.0.1:8080",
    key: KeyOption = "",
    watch: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = False,
) -> None:
    """Submit a job file; print its job id (and follow it with --watch)."""
    from manifests.jobspec import JobSpecError, read_job_file
    from server.api_client import ApiError

    try:
        form = read_job_file(job)
    except JobSpecError as exc:
        raise _exit(EXIT_INVALID, "; ".join(exc.problems)) from None
    with _client(url, key) as api:
        try:
            submitted = api.submit(form)
        except ApiError as exc:
            raise _api_exit(exc) from None
        typer.echo(submitted["job_id"])
        if watch:
            _watch(api, submitted["job_id"])


def _watch(api: Any, job_id: str) -> None:
    from rich.progress import BarColumn, Progress, TextColumn

    from server.api_client import ApiError

    status: dict[str, Any] = {}
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("round {task.completed:.0f}/{task.total:.0f}"),
            console=Console(stderr=True),
        ) as progress:
            task = progress.add_task(job_id, total=1)
            for event in api.events(job_id):
                if event.event == "progress":
                    data = event.data
                    total = float(data.get("num_rounds") or 1)
                    progress.update(task, total=total, description=str(data.get("artifact_name")))
                    if data.get("kind") == "round_finished":
                        progress.update(task, completed=float(data.get("server_round", 0)))
                elif event.event == "status":
                    status = event.data
    except ApiError as exc:
        raise _api_exit(exc) from None
    state = status.get("status", "unknown")
    typer.echo(
        f"{job_id}: {state}" + (f" (run {status['run_id']})" if status.get("run_id") else "")
    )
    if state != "succeeded":
        raise typer.Exit(EXIT_FAILED)


@remote_app.command("watch")
def remote_watch(
    job_id: Annotated[str, typer.Argument()],
    url: UrlOption = "http://127.0.0.1:8080",
    key: KeyOption = "",
) -> None:
    """Follow a job with a progress bar; exit 0 when it succeeded, 1 otherwise."""
    with _client(url, key) as api:
        _watch(api, job_id)


@remote_app.command("list")
def remote_list(
    url: UrlOption = "http://127.0.0.1:8080",
    key: KeyOption = "",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every run on the server, newest first."""
    from server.api_client import ApiError

    with _client(url, key) as api:
        try:
            page = api.runs(limit=1000)
        except ApiError as exc:
            raise _api_exit(exc) from None
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    table = Table(title=f"runs ({page['total']})")
    for column in ("run", "artifact", "status", "rounds recorded", "epsilon spent", "reliability"):
        table.add_column(column)
    for run in page["runs"]:
        table.add_row(
            escape(str(run["run_id"])),
            escape(str(run["artifact_name"])),
            str(run["status"]),
            str(run["rounds_recorded"]),
            str(run.get("epsilon_spent") if run.get("epsilon_spent") is not None else "-"),
            str(run.get("reliability") if run.get("reliability") is not None else "-"),
        )
    Console(width=200).print(table)


@remote_app.command("cancel")
def remote_cancel(
    job_id: Annotated[str, typer.Argument()],
    url: UrlOption = "http://127.0.0.1:8080",
    key: KeyOption = "",
) -> None:
    """Cancel a queued or running job."""
    from server.api_client import ApiError

    with _client(url, key) as api:
        try:
            api.cancel(job_id)
        except ApiError as exc:
            raise _api_exit(exc) from None
    typer.echo(f"cancel requested for {job_id}", err=True)


@remote_app.command("fetch")
def remote_fetch(
    run_id: Annotated[str, typer.Argument()],
    out: Annotated[Path, typer.Option(help="Where to write the bundle (.zip).")],
    url: UrlOption = "http://127.0.0.1:8080",
    key: KeyOption = "",
    trusted_keys: Annotated[
        Path | None,
        typer.Option(help="Verify with this pinned trusted-keys file (default: the server's)."),
    ] = None,
) -> None:
    """Download a run's bundle and verify it locally (exit 1 if it does not verify)."""
    from datetime import UTC, datetime

    from manifests.keys import TrustedKeys
    from manifests.verify import BundleVerificationError, verify_bundle
    from server.api_client import ApiError

    with _client(url, key) as api:
        try:
            api.download_bundle(run_id, out)
            pinned = None if trusted_keys is not None else api.trusted_keys()
        except ApiError as exc:
            raise _api_exit(exc) from None
    try:
        if pinned is None and trusted_keys is not None:
            keys = TrustedKeys.load(trusted_keys)
        else:
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "trusted_keys.json"
                path.write_bytes(pinned or b"")
                keys = TrustedKeys.load(path)
    except (OSError, ValueError) as exc:
        raise _exit(EXIT_INVALID, f"cannot read the trusted keys: {exc}") from None
    try:
        result = verify_bundle(out, keys, now=datetime.now(UTC))
    except BundleVerificationError as exc:
        raise _exit(EXIT_FAILED, f"{out}: verification failed: {exc}") from None
    source = trusted_keys if trusted_keys is not None else "the server's trusted keys"
    typer.echo(f"{out}: verified ({result.artifact_name}, signed by {result.keyid}; {source})")


def register(app: typer.Typer) -> None:
    """Attach ``serve``, ``api-keys``, ``audit`` and ``remote`` to the root app."""
    app.command("serve")(serve)
    app.add_typer(keys_app, name="api-keys")
    app.add_typer(audit_app, name="audit")
    app.add_typer(remote_app, name="remote")
