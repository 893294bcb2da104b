"""A node's SuperExec that starts each ClientApp task from a warm process.

Flower 1.42 runs one ``flwr-clientapp`` process per message (``run_clientapp`` pulls one task
and exits); started the usual way, that process is a fresh interpreter that imports Flower,
fedbrain, torch and transformers again for every message -- 5-8 CPU-seconds per message on a
2-core node (benchmarks/RESULTS.md, "Issue 9"). Here a forkserver that has imported all of
that once forks the task processes, so a message pays for a fork, not for the imports.

``fedbrain node start`` runs ``flower-supernode --isolation process`` and this module next to
it (:mod:`clients.daemon`): Flower's own SuperExec loop (:func:`run_superexec`) with the
executor swapped for :class:`WarmForkExecutor`. Each task still runs in its own process, with
Flower's ``run_clientapp`` (the same token handshake, heartbeat and error reporting), so a
task that crashes or is killed takes nothing else down. The forkserver itself only imports:
it never trains or runs a task, so no thread pools exist when it forks.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
from collections.abc import Sequence
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import Final

import flwr.supercore.superexec.run_superexec as flower_superexec
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

__all__ = ["PRELOAD", "WarmForkExecutor", "main"]

PRELOAD: Final = (
    "flwr.supernode.runtime.run_clientapp",
    "clients.app",
    "clients.node",  # torch and transformers: the bulk of a message's former cost
    # Opacus' accountants (scipy.stats with them, ~1.9 s) are imported on first use by the
    # DP calibration a node runs for every job it admits: import them here, once.
    "opacus.accountants",
    "opacus.accountants.utils",
    "opacus.accountants.analysis.rdp",
)
"""Modules the forkserver imports once, before it forks any task process."""


def _run_task(
    runtime_api_address: str,
    token: str,
    insecure: bool,
    root_certificates_path: str | None,
    parent_pid: int | None,
    runtime_dependency_install: bool,
) -> None:
    """One ClientApp task, in a process forked from the warm forkserver; its CPU time goes to
    the node's log (``clientapp task: ... CPU-s``)."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    try:
        run_clientapp(
            runtime_api_address=runtime_api_address,
            token=token,
            insecure=insecure,
            certificates=validate_and_resolve_root_certificates(root_certificates_path, insecure),
            parent_pid=parent_pid,
            runtime_dependency_install=runtime_dependency_install,
        )
    finally:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print(
            f"clientapp task: {usage.ru_utime + usage.ru_stime:.3f} CPU-s",
            file=sys.stderr,
            flush=True,
        )


class WarmForkExecutor:
    """Flower's executor interface: ClientApp tasks are forked from a warm forkserver (other
    task types, which a SuperNode never gets, go to Flower's subprocess executor)."""

    def __init__(self, preload: Sequence[str] = PRELOAD) -> None:
        context = multiprocessing.get_context("forkserver")
        assert isinstance(context, ForkServerContext)
        context.set_forkserver_preload(list(preload))
        self._context = context
        self._children: list[BaseProcess] = []
        self._fallback = SubprocessExecutor()

    def warm_up(self) -> None:
        """Start the forkserver now (it imports :data:`PRELOAD`), not on the first task."""
        from multiprocessing import forkserver

        forkserver.ensure_running()

    def get_eligible_capacity(
        self,
        supported_task_types: set[TaskType],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[TaskType], set[str]]:
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(
        self,
        task_type: TaskType | None = None,
        *,
        fab_hash: str | None = None,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> None:
        del task_type, fab_hash, insecure, root_certificates_path

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        child = self._context.Process(
            target=_run_task,
            args=(
                spec.runtime_api_address,
                spec.token,
                spec.insecure,
                spec.root_certificates_path,
                spec.parent_pid,
                spec.runtime_dependency_install,
            ),
            name=f"clientapp-task-{spec.task_id}",
        )
        try:
            child.start()
        except OSError as exc:
            return LaunchResult.failed(f"could not fork the ClientApp task: {exc}")
        self._children.append(child)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished task processes."""
        running = []
        for child in self._children:
            if child.is_alive():
                running.append(child)
            else:
                child.join(0)
        self._children = running

    def close(self) -> None:
        for child in self._children:
            if child.is_alive():
                child.terminate()
        self._children = []


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clients.superexec",
        description="A SuperExec for flower-supernode --isolation process: ClientApp tasks "
        "forked from a warm process (see clients/superexec.py).",
    )
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    executor = WarmForkExecutor()
    executor.warm_up()

    def get_executor(*_args: object, **_kwargs: object) -> WarmForkExecutor:
        return executor

    # Flower's loop, our executor: run_superexec builds its executor with this name.
    setattr(flower_superexec, "get_executor", get_executor)  # noqa: B010
    flower_superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        parent_pid=args.parent_pid if args.parent_pid is not None else os.getppid(),
    )


if __name__ == "__main__":
    main(sys.argv[1:])
