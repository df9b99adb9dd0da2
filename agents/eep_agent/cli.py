"""``eep-agent``: the per-node daemon and its tools."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import typer

from eep_agent.devices import detect_devices, parse_devices
from eep_agent.settings import AgentSettings, start_method
from eep_controller.logs import LEVELS, format_option, level_option, setup_logging
from eep_controller.version_option import version_option

app = typer.Typer(
    help="eep agent: runs expert-parallel workers on this node.", no_args_is_help=True
)


@app.callback()
def _group(_version: bool = version_option("eep-agent")) -> None:
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
    log_level: str = typer.Option(
        "INFO", callback=level_option, help=f"one of {', '.join(LEVELS)}"
    ),
    worker_log_level: str = typer.Option(
        "WARNING", callback=level_option, help="log level of the worker processes"
    ),
    log_format: str = typer.Option(
        "text",
        envvar="EEP_LOG_FORMAT",
        callback=format_option,
        help="text, or json: one JSON object per line, the workers' lines too",
    ),
    worker_start: str = typer.Option(
        "forkserver",
        envvar="EEP_AGENT_WORKER_START",
        help="how worker processes start: forkserver (forked from a server that imported "
        "torch once) or spawn (a fresh interpreter each)",
    ),
    load_interval: float = typer.Option(
        2.0, min=0.1, help="seconds between load-window publications"
    ),
    shutdown_timeout: float = typer.Option(
        60.0,
        min=1.0,
        envvar="EEP_AGENT_SHUTDOWN_TIMEOUT_S",
        help="seconds a shutdown may take; then the workers are killed and the agent exits 3",
    ),
) -> None:
    """Register this node and run its workers until SIGTERM."""
    from eep_agent.daemon import AgentDaemon

    setup_logging(log_level, log_format)
    try:
        devs = parse_devices(devices) if devices else detect_devices()
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--devices") from None
    try:
        method = start_method(worker_start)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--worker-start") from None
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
        load_interval_s=load_interval,
        worker_log_level=worker_log_level,
        log_format=log_format,
        worker_start=method,
        shutdown_timeout_s=shutdown_timeout,
    )
    asyncio.run(AgentDaemon(settings).run())


@app.command("make-checkpoint")
def make_checkpoint(
    layers: int = typer.Option(..., min=1, help="MoE layers"),
    experts: int = typer.Option(..., min=1, help="logical experts per layer"),
    hidden: int = typer.Option(..., min=1, help="hidden size H"),
    inter: int = typer.Option(..., min=1, help="expert intermediate size I"),
    seed: int = typer.Option(0, help="the same seed writes the same bytes"),
    out: Path = typer.Option(..., help="directory to write (created if missing)"),
    top_k: int = typer.Option(2, "--top-k", min=1, help="experts per token of the router"),
) -> None:
    """Write a deterministic synthetic checkpoint (safetensors per layer + eep-checkpoint.json)."""
    from eep_controller.probe.checkpoint import write_synthetic

    try:
        meta = write_synthetic(
            out, layers=layers, experts=experts, hidden=hidden, inter=inter, seed=seed, top_k=top_k
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    total = meta.layers * meta.experts * meta.expert_bytes
    typer.echo(
        f"wrote {out}: {meta.layers} layers x {meta.experts} experts "
        f"(H={meta.hidden}, I={meta.inter}, top-k {meta.top_k}), {total / 1e6:.1f} MB of experts"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
