"""``eepctl events``: a deployment's audit trail, and with ``--follow`` its live stream."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import typer
from rich.markup import escape
from rich.table import Table

from eep_controller.cli.ctl import (
    Output,
    OutputOpt,
    _fail,
    app,
    console,
    emit,
    err_console,
    opts,
    problem_text,
    request,
)
from eep_controller.cli.output import local_time

# Pause before reconnecting a stream that broke (a controller restart, a failover).
RECONNECT_S = 1.0


def _line(event: dict[str, Any]) -> str:
    op = event.get("op_id") or "-"
    return f"{local_time(event['time'])}  {event['type']:<22} {op:<24} {event['message']}"


def _show(event: dict[str, Any], output: Output) -> None:
    if output is Output.JSON:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()
    else:
        console.print(escape(_line(event)), highlight=False, soft_wrap=True)


def stream_events(deployment: str, since: int) -> Iterator[dict[str, Any]]:
    """Events of `deployment` written after seq `since`, as they come, for ever: a broken
    stream is opened again from the last event seen, so none still stored is missed."""
    headers = {"Accept": "text/event-stream"}
    if opts.token:
        headers["Authorization"] = f"Bearer {opts.token}"
    url = f"{opts.server}/v1/events"
    # no read timeout: the controller sends a keep-alive comment every 15 s
    timeout = httpx.Timeout(opts.timeout, read=None)
    # why the stream is down, as last told (each kind of failure is told once, not per retry)
    down: str | None = None
    while True:
        try:
            params: dict[str, str | int] = {"deployment": deployment, "since": since}
            with httpx.stream("GET", url, params=params, headers=headers, timeout=timeout) as r:
                if r.status_code >= 400:
                    r.read()
                    if r.status_code < 500:
                        _fail(
                            f"{r.status_code} {problem_text(r)}"
                        )  # a retry would get the same answer
                    # a 5xx (the controller cannot reach etcd, say) is retried
                    if down != str(r.status_code):
                        err_console.print(
                            f"event stream unavailable ({r.status_code} {problem_text(r)}); retrying",
                            markup=False,
                        )
                        down = str(r.status_code)
                else:
                    if down is not None:
                        err_console.print("event stream back")
                        down = None
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            event = json.loads(line[len("data: ") :])
                            since = max(since, int(event["seq"]))
                            yield event
        except httpx.HTTPError as exc:
            if down != type(exc).__name__:
                err_console.print(f"event stream lost ({exc}); reconnecting", markup=False)
                down = type(exc).__name__
        time.sleep(RECONNECT_S)


@app.command()
def events(
    deployment: str,
    op_id: str | None = typer.Option(None, "--op", help="only this operation's events"),
    limit: int = typer.Option(20, min=1, max=1000, help="how many of the newest to show"),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="then stream new events as they come (Ctrl-C stops)"
    ),
    output: Output = OutputOpt,
) -> None:
    """A deployment's newest audit events, oldest first; --follow keeps streaming them."""
    params: dict[str, str | int] = {"limit": limit}
    if op_id:
        params["op_id"] = op_id
    data = request("GET", f"/v1/deployments/{deployment}/events", params=params)
    items: list[dict[str, Any]] = list(reversed(data["items"]))
    if not follow:
        table = Table("TIME", "TYPE", "OP", "MESSAGE", title=f"{deployment} events")
        for e in items:
            table.add_row(
                local_time(e["time"]), e["type"], e.get("op_id") or "-", escape(e["message"])
            )
        emit(data, output, table)
        return
    for e in items:
        _show(e, output)
    # from the newest shown (or from the start of what is stored when there was none), so
    # nothing written between the listing and the stream is missed
    since = int(items[-1]["seq"]) if items else 0
    try:
        for e in stream_events(deployment, since):
            if op_id is None or e.get("op_id") == op_id:
                _show(e, output)
    except KeyboardInterrupt:
        return
