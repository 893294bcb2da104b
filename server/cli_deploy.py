"""Deployment commands: ``fedbrain provision``, ``fedbrain server start|sync-nodes``,
``fedbrain run``.

Exit codes (:mod:`manifests.cli_errors`): 0 done (for ``run``: the run passed and its bundle
was signed); 1 the operation failed (the run failed or was rejected, the SuperLink was lost);
2 invalid input (a federation file, kit, job or option that cannot be used). Errors are one
line on stderr, except the lists of problems of a federation file or kit, one per line.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from manifests.cli_errors import EXIT_FAILED, EXIT_INVALID, one_line

__all__ = ["register"]


class _DefaultCommandGroup(TyperGroup):
    """``fedbrain provision FEDERATION.toml`` runs ``create``; ``add-node`` and
    ``revoke-node`` are commands of the same group."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["create", *args]
        return super().parse_args(ctx, args)


provision_app = typer.Typer(
    cls=_DefaultCommandGroup,
    no_args_is_help=True,
    help="Provision a federation: FEDERATION.toml --out DIR, then add-node / revoke-node.",
)
server_app = typer.Typer(no_args_is_help=True, help="The SuperLink of a server kit.")


def _fail(message: str, code: int = EXIT_INVALID) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _echo(line: str) -> None:
    typer.echo(line)


@provision_app.command("create")
def provision_create(
    federation: Annotated[Path, typer.Argument(help="The federation file (TOML).")],
    out: Annotated[Path, typer.Option("--out", help="New folder for the kits.")],
    kit_root: Annotated[
        Path | None,
        typer.Option(
            "--kit-root",
            help="Where the kits will live on their machines, for the systemd units and "
            "READMEs (default: --out, for a federation on one machine).",
        ),
    ] = None,
) -> None:
    """Write the CA, the SuperLink's certificate, the keys and one startup kit per role."""
    from server.federation_file import FederationFileError, load_federation_file
    from server.startup_kits import ProvisioningError, provision_federation

    try:
        spec = load_federation_file(federation)
        done = provision_federation(spec, out, kit_root=kit_root)
    except FederationFileError as exc:
        typer.echo(f"error: {federation}: the federation file cannot be used:", err=True)
        for problem in exc.problems:
            typer.echo(f"- {problem}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    except (ProvisioningError, OSError, ValueError) as exc:
        raise _fail(one_line(exc)) from None
    typer.echo(f"federation {spec.name!r} provisioned in {done.root}")
    typer.echo(f"  server kit     {done.server}")
    for name, kit in done.nodes.items():
        typer.echo(f"  node kit       {kit}  ({name})")
    for name, kit in done.operators.items():
        typer.echo(f"  operator kit   {kit}  ({name})")
    typer.echo(f"  CA key         {done.root / 'ca'} (keep it offline)")


@provision_app.command("add-node")
def provision_add_node(
    root: Annotated[Path, typer.Argument(help="The folder `fedbrain provision` wrote.")],
    name: Annotated[str, typer.Option("--name", help="The new node's unique name.")],
    node_type: Annotated[str, typer.Option("--node-type", help="sensing, encoder, inference.")],
    data: Annotated[str, typer.Option("--data", help="Its data folder on its machine.")],
    runtime_port: Annotated[
        int | None, typer.Option("--runtime-port", help="Its local ClientApp port.")
    ] = None,
    policy: Annotated[Path | None, typer.Option("--policy", help="Its policy file.")] = None,
) -> None:
    """Provision one more node: its kit, the re-signed roster, its key for the SuperLink."""
    import json

    from server.federation_file import (
        DEFAULT_RUNTIME_PORT,
        FederationFileError,
        parse_federation,
    )
    from server.startup_kits import REGISTRY_FILE, ProvisioningError, add_node

    try:
        registry = json.loads((root / REGISTRY_FILE).read_text("utf-8"))
        ports = [int(n["runtime_port"]) for n in registry.get("nodes", [])]
        port = runtime_port or max([DEFAULT_RUNTIME_PORT - 1, *ports]) + 1
        node: dict[str, Any] = {
            "name": name,
            "node_type": node_type,
            "data": data,
            "runtime_port": port,
        }
        if policy is not None:
            node["policy"] = str(policy.absolute())
        document = {
            "federation": {"name": registry["federation"], "superlink": registry["superlink"]},
            "operators": [{"name": n} for n in registry["operators"]],
            "nodes": [node],
        }
        spec = parse_federation(document, source="add-node", base=Path.cwd()).nodes[0]
        kit = add_node(root, spec)
    except FederationFileError as exc:
        raise _fail("; ".join(exc.problems)) from None
    except (ProvisioningError, OSError, ValueError, KeyError) as exc:
        raise _fail(one_line(exc)) from None
    typer.echo(f"node {name!r} provisioned: {kit}")
    typer.echo(f"  roster re-signed: {root / 'roster.dsse.json'} (also in the server kit)")
    typer.echo("  next: fedbrain server sync-nodes --kit <server kit> (or restart the server),")
    typer.echo("  and `fedbrain node roster install` of the new roster on the other nodes")


@provision_app.command("revoke-node")
def provision_revoke_node(
    root: Annotated[Path, typer.Argument(help="The folder `fedbrain provision` wrote.")],
    name: Annotated[str, typer.Argument(help="The node to revoke.")],
) -> None:
    """Revoke a node: the roster marks it revoked; the SuperLink unregisters its key."""
    from server.startup_kits import ProvisioningError, revoke_node

    try:
        revoke_node(root, name)
    except (ProvisioningError, OSError, ValueError) as exc:
        raise _fail(one_line(exc)) from None
    typer.echo(f"node {name!r} revoked in {root / 'roster.dsse.json'} (also in the server kit)")
    typer.echo("  next: fedbrain server sync-nodes --kit <server kit> (or restart the server),")
    typer.echo("  and `fedbrain node roster install` of the new roster on the other nodes")


KitOption = Annotated[Path, typer.Option("--kit", help="The server kit folder.")]
InsecureOption = Annotated[
    bool, typer.Option("--insecure", help="No TLS, no node authentication: a demo only.")
]


@server_app.command("start")
def server_start(kit: KitOption, insecure: InsecureOption = False) -> None:
    """Run the SuperLink with TLS, node authentication and a persistent database."""
    from server.server_kit import ServerKitError, load_server_kit
    from server.superlink import serve

    try:
        loaded = load_server_kit(kit, insecure=insecure)
    except ServerKitError as exc:
        raise _fail(str(exc)) from None
    try:
        code = serve(loaded, insecure=insecure, echo=_echo)
    except (RuntimeError, OSError, ValueError) as exc:
        raise _fail(one_line(exc), EXIT_FAILED) from None
    raise typer.Exit(code)


@server_app.command("sync-nodes")
def server_sync_nodes(kit: KitOption) -> None:
    """Make a running SuperLink's node registrations those of the kit (after add/revoke)."""
    from server.control import ControlClient, ControlError, load_authorized_nodes, sync_nodes
    from server.server_kit import ServerKitError, load_server_kit

    try:
        loaded = load_server_kit(kit)
        authorized = load_authorized_nodes(loaded.authorized_nodes)
        with ControlClient(loaded.local_address, root_certificates=loaded.ca, insecure=False) as c:
            report = sync_nodes(c, authorized)
    except (ServerKitError, ValueError) as exc:
        raise _fail(one_line(exc)) from None
    except ControlError as exc:
        raise _fail(one_line(exc), EXIT_FAILED) from None
    typer.echo(
        f"registered: {', '.join(report.registered) or '-'}; "
        f"unregistered: {', '.join(report.unregistered) or '-'}; kept: {len(report.kept)}"
    )


def _options(values: list[str]) -> dict[str, object]:
    options: dict[str, object] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("fedbrain.")
        if not sep or not key:
            raise ValueError(f"--option takes KEY=VALUE (a fedbrain.* run option). Found {item!r}.")
        try:
            options[key] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            options[key] = raw.strip()
    return options


def run_command(
    job: Annotated[Path, typer.Argument(help="The job file (.toml or .json).")],
    kit: Annotated[Path, typer.Option("--kit", help="The operator kit folder.")],
    resume: Annotated[
        str | None, typer.Option("--resume", help="Continue this run from its last checkpoint.")
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", help="A fedbrain.* run option, KEY=VALUE (repeatable)."),
    ] = None,
    app: Annotated[
        Path | None, typer.Option("--app", help="fedbrain's source folder (default: found).")
    ] = None,
    insecure: InsecureOption = False,
) -> None:
    """Sign the job, submit it, stream its progress; exit 0 only if it passed."""
    from manifests.jobspec import JobSpecError, load_job
    from manifests.keys import KeyVerificationError
    from manifests.signed_job import SignedJobError
    from server.control import ControlError
    from server.submit import (
        SubmitError,
        default_app_dir,
        follow,
        load_operator_kit,
        prepare_run,
        submit,
    )

    try:
        operator = load_operator_kit(kit)
        spec = load_job(job)
        options = _options(option or [])
        prepared = prepare_run(operator, spec, resume=resume)
        app_dir = app or default_app_dir()
    except (SubmitError, JobSpecError, KeyVerificationError, SignedJobError, OSError) as exc:
        raise _fail(one_line(exc)) from None
    except ValueError as exc:
        raise _fail(one_line(exc)) from None
    verb = "resuming" if prepared.resume else "starting"
    typer.echo(f"fedbrain: {verb} run {prepared.run_id} on {operator.superlink}")
    try:
        flower_run = submit(operator, prepared, options, app=app_dir, insecure=insecure)
        typer.echo(f"fedbrain: run {prepared.run_id} is Flower run {flower_run}")
        final = follow(operator, flower_run, insecure=insecure, echo=_echo)
    except ControlError as exc:
        typer.echo(f"error: {one_line(exc)}", err=True)
        typer.echo(
            f"the run may be interrupted: once the server is back, resume it with\n"
            f"  fedbrain run {job} --kit {kit} --resume {prepared.run_id}",
            err=True,
        )
        raise typer.Exit(EXIT_FAILED) from None
    except KeyboardInterrupt:
        typer.echo(
            f"stopped following run {prepared.run_id}; it goes on on the SuperLink "
            "(fedbrain runs show / flwr log)",
            err=True,
        )
        raise typer.Exit(130) from None
    summary = f"fedbrain: run {prepared.run_id} (Flower run {flower_run}): {final.label}"
    if final.label == "finished:completed":
        typer.echo(summary)
        return
    typer.echo(summary + (f": {final.details}" if final.details else ""), err=True)
    raise typer.Exit(EXIT_FAILED)


def register(app: typer.Typer) -> None:
    """Attach the deployment commands to the root ``fedbrain`` app."""
    app.add_typer(provision_app, name="provision")
    app.add_typer(server_app, name="server")
    app.command("run")(run_command)
