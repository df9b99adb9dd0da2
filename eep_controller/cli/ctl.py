"""``eepctl``: the command-line client of the controller's REST API."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

import httpx
import typer
import yaml
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from eep_controller.cli.output import byte_size, local_time, make_console
from eep_controller.version_option import version_option

app = typer.Typer(help="eepctl: talk to an eep controller.", no_args_is_help=True)
get_app = typer.Typer(help="Show one resource.", no_args_is_help=True)
create_app = typer.Typer(help="Create a resource from a file.", no_args_is_help=True)
app.add_typer(get_app, name="get")
app.add_typer(create_app, name="create")

console = make_console()
err_console = make_console(stderr=True)


class Output(str, Enum):
    TABLE = "table"
    JSON = "json"


class _Opts:
    server: str = "http://127.0.0.1:8080"
    token: str | None = None
    timeout: float = 30.0


opts = _Opts()


@app.callback()
def _global(
    server: str = typer.Option(
        opts.server, "--server", "-s", envvar="EEP_SERVER", help="controller URL"
    ),
    token: str | None = typer.Option(None, "--token", envvar="EEP_TOKEN", help="bearer token"),
    timeout: float = typer.Option(30.0, "--timeout", help="seconds per request"),
    _version: bool = version_option("eepctl"),
) -> None:
    """eepctl: talk to an eep controller."""
    opts.server = server.rstrip("/")
    opts.token = token
    opts.timeout = timeout


def _fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def request(method: str, path: str, **kw: Any) -> Any:
    """One API call; problem+json errors become a readable message and exit code 1."""
    headers = dict(kw.pop("headers", {}) or {})
    if opts.token:
        headers["Authorization"] = f"Bearer {opts.token}"
    try:
        resp = httpx.request(
            method, opts.server + path, headers=headers, timeout=opts.timeout, **kw
        )
    except httpx.HTTPError as exc:
        _fail(f"cannot reach {opts.server}: {exc}")
    if resp.status_code >= 400:
        _fail(f"{resp.status_code} {problem_text(resp)}")
    return resp.json() if resp.content else None


def problem_text(resp: httpx.Response) -> str:
    """A problem+json answer as text: its detail (else title), then its extra fields one
    per line; an answer that is not JSON as it came."""
    try:
        body = resp.json()
        detail = body.get("detail") or body.get("title") or resp.text
        extra = {
            k: v
            for k, v in body.items()
            if k not in ("type", "title", "status", "detail", "errors")
        }
    except ValueError:
        detail, extra = resp.text, {}
    return str(detail) + "".join(f"\n  {k}: {v}" for k, v in extra.items())


def emit(data: Any, output: Output, table: RenderableType | None) -> None:
    """`data` as JSON, or with table output (the default) `table` when there is one."""
    if output is Output.JSON or table is None:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        console.print(table)


OutputOpt = typer.Option(Output.TABLE, "--output", "-o", help="table or json")


@app.command()
def nodes(output: Output = OutputOpt) -> None:
    """List nodes with a live agent, then lost nodes that still hold ranks."""
    data = request("GET", "/v1/nodes")
    table = Table("NODE", "ADDRESS", "DEVICES", "AGENT", "LABELS")
    for n in data["items"]:
        kinds: dict[str, int] = {}
        for d in n["devices"]:
            kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
        devs = ", ".join(f"{k}:{v}" for k, v in sorted(kinds.items()))
        labels = ",".join(f"{k}={v}" for k, v in n.get("labels", {}).items())
        table.add_row(n["node_id"], n["address"], devs, n["agent_version"], escape(labels))
    # nodes whose agent is gone but which some deployment still places ranks on
    lost = [
        Text(f"lost: {n['node_id']} (agent gone) holds {_ranks_held(n['ranks'])}")
        for n in data.get("lost", [])
    ]
    emit(data, output, Group(table, *lost) if lost else table)


def _ranks_held(ranks: dict[str, list[int]]) -> str:
    return "; ".join(
        f"{name} rank{'s' if len(held) > 1 else ''} {', '.join(map(str, held))}"
        for name, held in sorted(ranks.items())
    )


def _deployment_row(d: dict[str, Any]) -> list[str]:
    spec = d["spec"]
    return [
        d["name"],
        d["status"],
        str(d["dp_size"]),
        f"{spec['min_dp']}..{spec['max_dp']}",
        str(d["ep_size"]),
        str(d["generation"]),
        spec["actuator"],
        d.get("active_operation") or "-",
    ]


_DEPLOYMENT_COLS = ("NAME", "STATUS", "DP", "DP RANGE", "EP", "GEN", "ACTUATOR", "ACTIVE OP")


def _deployments_shown(items: list[dict[str, Any]]) -> RenderableType:
    """The deployments as a table, with the note of each that has one (why it waits) below."""
    table = Table(*_DEPLOYMENT_COLS)
    for d in items:
        table.add_row(*_deployment_row(d))
    notes = [Text(f"{d['name']}: {d['note']}") for d in items if d.get("note")]
    return Group(table, *notes) if notes else table


@app.command()
def deployments(output: Output = OutputOpt) -> None:
    """List deployments."""
    data = request("GET", "/v1/deployments")
    emit(data, output, _deployments_shown(data["items"]))


@get_app.command("deployment")
def get_deployment(name: str, output: Output = OutputOpt) -> None:
    """Show one deployment."""
    data = request("GET", f"/v1/deployments/{name}")
    emit(data, output, _deployments_shown([data]))


@get_app.command("node")
def get_node(node_id: str, output: Output = OutputOpt) -> None:
    """Show one node."""
    data = request("GET", f"/v1/nodes/{node_id}")
    table = Table("NODE", "ADDRESS", "DEVICE", "KIND", "MEMORY")
    for d in data["devices"]:
        table.add_row(
            data["node_id"],
            data["address"],
            str(d["index"]),
            d["kind"],
            byte_size(d["memory"]) if d["memory"] else "-",  # 0: not known (CPU devices)
        )
    emit(data, output, table)


@create_app.command("deployment")
def create_deployment(
    file: Path = typer.Option(
        ..., "--file", "-f", exists=True, dir_okay=False, help="spec as YAML or JSON"
    ),
    output: Output = OutputOpt,
) -> None:
    """Declare a deployment from a YAML/JSON spec file."""
    try:
        spec = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        _fail(f"{file} is not valid YAML: {exc}")
    if not isinstance(spec, dict):
        _fail(f"{file} must hold a mapping (the deployment spec)")
    data = request("POST", "/v1/deployments", json=spec)
    emit(data, output, _deployments_shown([data]))


@app.command("delete")
def delete(
    kind: str = typer.Argument(..., help="deployment"), name: str = typer.Argument(...)
) -> None:
    """Delete a deployment."""
    if kind not in ("deployment", "deployments"):
        _fail(f"cannot delete {kind!r}: only deployments")
    request("DELETE", f"/v1/deployments/{name}")
    console.print(f"deployment {name} deleted")


@app.command()
def leader(output: Output = OutputOpt) -> None:
    """Show the controller replica that leads."""
    data = request("GET", "/v1/leader")
    table = Table("REPLICA", "ADDRESS", "SINCE")
    table.add_row(data["replica_id"], data["address"], local_time(data["since"]))
    emit(data, output, table)


def main() -> None:
    # register their commands: scale, ops, op, cancel, layout; events
    from eep_controller.cli import events_commands, ops_commands  # noqa: F401

    app()


if __name__ == "__main__":
    main()
