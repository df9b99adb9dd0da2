"""``eepctl`` commands for operations: scale (with live progress), ops, op, cancel, layout."""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from eep_controller.cli.ctl import (
    Output,
    OutputOpt,
    _fail,
    app,
    console,
    emit,
    err_console,
    request,
)
from eep_controller.cli.output import balance_change, byte_size, duration

PHASES = ("PREPARING", "TRANSFERRING", "SWITCHING", "CLEANUP")
# Exit code of `scale --wait` stopped by Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130


def _plan_table(plan: dict[str, Any]) -> Table:
    table = Table("PLAN", "VALUE", title="scale plan")
    table.add_row("dp", f"{plan['from_dp']} -> {plan['to_dp']}")
    table.add_row("ranks added", str(len(plan.get("ranks_added", []))))
    table.add_row("ranks removed", str(len(plan.get("ranks_removed", []))))
    table.add_row("copies (lower bound)", f"{plan['copies']} ({plan['lower_bound']})")
    table.add_row("checkpoint reloads", str(plan["checkpoint_reloads"]))
    world = str(plan.get("transfer_world", "-"))
    if plan.get("transfer_note"):
        world += f" ({plan['transfer_note']})"
    table.add_row("transfer world", escape(world))
    table.add_row("bytes", byte_size(plan["bytes"]))
    table.add_row(
        "max bytes in / out per rank",
        f"{byte_size(plan['max_rank_bytes_in'])} / {byte_size(plan['max_rank_bytes_out'])}",
    )
    table.add_row("balancedness", balance_change(plan, 4))
    table.add_row(
        "estimated transfer time",
        f"{duration(plan['est_transfer_s'])} in {plan['rounds']} rounds"
        f" (lower bound {duration(plan['makespan_lower_bound_s'])})",
    )
    return table


def watch_operation(
    op_id: str, *, poll_s: float = 0.3, timeout_s: float = 3600, to_stderr: bool = False
) -> dict[str, Any]:
    """Show a progress bar per phase (participants acked / total, bytes) until the op ends;
    on stderr with `to_stderr`, so stdout keeps only what the caller prints (JSON, say)."""
    deadline = time.monotonic() + timeout_s
    op: dict[str, Any] = request("GET", f"/v1/operations/{op_id}")
    with Progress(
        TextColumn("{task.description:<13}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[extra]}"),
        TimeElapsedColumn(),
        console=err_console if to_stderr else console,
        transient=False,
    ) as progress:
        tasks: dict[str, TaskID] = {}
        total = max(1, len(op.get("plan", {}).get("participants", [])))
        for phase in PHASES:
            tasks[phase] = progress.add_task(phase, total=total, extra="", start=False)
        while True:
            for phase in PHASES:
                p = op.get("progress", {}).get(phase, {})
                extra = ""
                if phase == "TRANSFERRING" and p.get("bytes_received"):
                    extra = byte_size(p["bytes_received"])
                if p.get("failed"):
                    extra += f" [red]{p['failed']} failed[/]"
                if p.get("acked") or phase == op["state"]:
                    progress.start_task(tasks[phase])
                progress.update(tasks[phase], completed=p.get("acked", 0), extra=extra)
            if op["state"] in ("SUCCEEDED", "ABORTED"):
                break
            if time.monotonic() > deadline:
                _fail(f"operation {op_id} still {op['state']} after {timeout_s:.0f}s")
            time.sleep(poll_s)
            op = request("GET", f"/v1/operations/{op_id}")
    return op


@app.command()
def scale(
    deployment: str,
    dp: int = typer.Option(..., "--dp", min=1, help="target data-parallel size"),
    remove: list[int] = typer.Option(
        [], "--remove", help="EP rank to remove on scale-down (repeatable)"
    ),
    drain_timeout: float = typer.Option(
        30.0, "--drain-timeout", help="seconds leaving ranks may drain"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="show the plan, change nothing"),
    wait: bool = typer.Option(
        False, "--wait", help="follow the operation with live progress until it ends"
    ),
    reason: str | None = typer.Option(None, "--reason"),
    idempotency_key: str | None = typer.Option(None, "--idempotency-key"),
    output: Output = OutputOpt,
) -> None:
    """Scale DEPLOYMENT to --dp data-parallel ranks."""
    body: dict[str, Any] = {"dp_size": dp, "drain_timeout_s": drain_timeout, "dry_run": dry_run}
    if remove:
        body["remove_ranks"] = remove
    if reason:
        body["reason"] = reason
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    data = request("POST", f"/v1/deployments/{deployment}/scale", json=body, headers=headers)
    if data.get("noop"):
        emit(data, output, None) if output is Output.JSON else console.print(
            data.get("detail", "nothing to do"), markup=False
        )
        return
    if dry_run:
        emit(data, output, _plan_table(data["plan"]))
        return
    if output is Output.TABLE:
        console.print(f"operation [bold]{data['id']}[/] ({data['kind']}) accepted")
    if not wait:
        emit(data, output, _op_table([data]))
        return
    try:
        # with -o json the bars go to stderr: off a terminal rich prints them when they end,
        # which put them in front of the JSON on stdout
        final = watch_operation(data["id"], to_stderr=output is Output.JSON)
    except KeyboardInterrupt:
        # only the watching stops: the operation is the controller's and goes on
        err_console.print(
            f"stopped watching; operation {data['id']} goes on: `eepctl op {data['id']}` shows "
            f"it, `eepctl cancel {data['id']}` cancels it (before its commit point)",
            markup=False,
        )
        raise typer.Exit(INTERRUPTED) from None
    emit(final, output, _op_table([final]))
    if final["state"] != "SUCCEEDED":
        _fail(f"operation {final['id']} {final['state']}: {final.get('error')}")


def _op_table(ops: list[dict[str, Any]]) -> Table:
    table = Table("ID", "KIND", "STATE", "DP", "GEN", "COPIES (LB)", "BYTES", "BALANCE", "ERROR")
    for op in ops:
        plan = op.get("plan") or {}
        table.add_row(
            op["id"],
            op["kind"],
            op["state"],
            f"{plan.get('from_dp', '?')} -> {plan.get('to_dp', '?')}",
            f"{op['from_generation']} -> {op['to_generation']}",
            f"{plan.get('copies', '-')} ({plan.get('lower_bound', '-')})",
            byte_size(op.get("bytes_moved") or plan.get("bytes", 0)),
            balance_change(plan),
            escape((op.get("error") or "")[:60]),
        )
    return table


@app.command()
def ops(
    deployment: str,
    limit: int = typer.Option(20, "--limit", min=1, max=500),
    output: Output = OutputOpt,
) -> None:
    """A deployment's operations, newest first."""
    data = request("GET", f"/v1/deployments/{deployment}/operations", params={"limit": limit})
    emit(data, output, _op_table(data["items"]))


@app.command()
def op(op_id: str, output: Output = OutputOpt) -> None:
    """One operation with its phases."""
    data = request("GET", f"/v1/operations/{op_id}")
    if output is Output.JSON:
        emit(data, output, None)
        return
    console.print(_op_table([data]))
    phases = Table("PHASE", "STARTED", "SECONDS", "ACKED")
    for rec in data.get("history", []):
        ended = rec.get("ended_at") or time.time()
        p = data.get("progress", {}).get(rec["phase"], {})
        phases.add_row(
            rec["phase"],
            time.strftime("%H:%M:%S", time.localtime(rec["started_at"])),
            f"{ended - rec['started_at']:.2f}",
            f"{p.get('acked', 0)}/{p.get('total', 0)}",
        )
    console.print(phases)


@app.command()
def cancel(op_id: str, output: Output = OutputOpt) -> None:
    """Cancel an operation (before its commit point)."""
    data = request("POST", f"/v1/operations/{op_id}/cancel")
    emit(data, output, _op_table([data]))


@app.command()
def layout(deployment: str, output: Output = OutputOpt) -> None:
    """The committed layout of a deployment."""
    data = request("GET", f"/v1/deployments/{deployment}/layout")
    # the heading is a line of its own: as the table's title it wrapped to the narrow table
    heading = Text(
        f"{deployment} generation {data['generation']} (dp {data['dp_size']}, ep {data['ep_size']})",
        style="bold",
    )
    shown: RenderableType
    if not data["ranks"]:
        # nothing committed yet: say why rather than draw an empty table
        note = (
            request("GET", f"/v1/deployments/{deployment}").get("note")
            if output is Output.TABLE
            else None
        )
        shown = Text(
            f"{deployment} has no rank yet (generation {data['generation']})"
            + (f": {note}" if note else "")
        )
        emit(data, output, shown)
        return
    table = Table("RANK", "NODE", "DEVICE")
    for r in data["ranks"]:
        table.add_row(str(r["rank"]), r["node_id"], str(r["device_index"]))
    parts: list[RenderableType] = [heading, table]
    if data.get("placement"):
        # one line under the table (a caption would wrap to the table's narrow width)
        p, b = data["placement"], data["balancedness"]
        parts.append(
            Text(
                f"{p['num_layers']} layers x {p['num_experts']} experts in "
                f"{p['physical_slots']} slots; replicas {p['replicas_min']}..{p['replicas_max']}; "
                f"balancedness {b['value']:.4f} ({b['scored_on']})"
            )
        )
    shown = Group(*parts)
    emit(data, output, shown)
