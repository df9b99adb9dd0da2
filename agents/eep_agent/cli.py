"""``eep-agent``: the per-node daemon and its tools."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import typer

from eep_agent.devices import detect_devices, parse_devices
from eep_agent.settings import AgentSettings

app = typer.Typer(
    help="eep agent: runs expert-parallel workers on this node.", no_args_is_help=True
)


@app.callback()
def _group() -> None:
    """eep agent: runs expert-parallel workers on this node."""


def _labels(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"labels look like key=value, got {item!r}")
        out[key] = value
    return out


@app.command()
def run(
    etcd: str = typer.Option(
        ..., envvar="EEP_ETCD_ENDPOINTS", help="etcd endpoints, comma separated"
    ),
    node_id: str = typer.Option(socket.gethostname(), envvar="EEP_NODE_ID", help="this node's id"),
    devices: str | None = typer.Option(None, help="cpu:N (or gpu:N / npu:N) instead of detection"),
    prefix: str = typer.Option("/eep/v1", envvar="EEP_ETCD_PREFIX"),
    lease_ttl: int = typer.Option(5, min=2, max=300, help="node lease TTL in seconds"),
    host: str = typer.Option("127.0.0.1", help="address the agent's HTTP endpoint binds"),
    port: int = typer.Option(0, min=0, max=65535, help="0 picks a free port"),
    advertise_host: str | None = typer.Option(None, help="host others use to reach this agent"),
    state_dir: Path = typer.Option(Path(".eep-state/agent"), help="where workers keep local state"),
    label: list[str] = typer.Option([], help="node label key=value (repeatable)"),
    log_level: str = typer.Option("INFO"),
) -> None:
    """Register this node and run its workers until SIGTERM."""
    from eep_agent.daemon import AgentDaemon

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        devs = parse_devices(devices) if devices else detect_devices()
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--devices") from None
    if not devs:
        raise typer.BadParameter(
            "no GPU or NPU found: pass --devices cpu:N", param_hint="--devices"
        )
    settings = AgentSettings(
        etcd_endpoints=[e.strip() for e in etcd.split(",") if e.strip()],
        node_id=node_id,
        devices=devs,
        prefix=prefix,
        lease_ttl_s=lease_ttl,
        host=host,
        port=port,
        advertise_host=advertise_host,
        state_dir=state_dir,
        labels=_labels(label),
    )
    asyncio.run(AgentDaemon(settings).run())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
