"""``eep-controller``: serve the control plane, print its config, run the demo."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import NoReturn

import typer
import yaml
from pydantic import ValidationError

from eep_controller.config import Settings, load_settings
from eep_controller.logs import LEVELS, format_option, level_option, setup_logging
from eep_controller.version_option import version_option

app = typer.Typer(
    help="eep controller: the control plane for elastic expert parallelism.", no_args_is_help=True
)


@app.callback()
def _group(_version: bool = version_option("eep-controller")) -> None:
    """eep controller: the control plane for elastic expert parallelism."""


def _settings(
    config: Path | None,
    etcd: str | None,
    host: str | None,
    port: int | None,
    data_dir: Path | None,
    insecure: bool,
) -> Settings:
    """The effective settings; a bad value or an unreadable config file exits with code 2 and
    one message naming the problem (no traceback)."""
    try:
        settings = load_settings(str(config) if config else None)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']} (got {e['input']!r})"
            for e in exc.errors()
        )
        _exit_with(
            f"invalid configuration: {problems} (from the EEP_* environment or the config file)"
        )
    except (OSError, ValueError, yaml.YAMLError) as exc:
        _exit_with(f"cannot read the configuration: {exc}")
    if etcd is not None:
        settings.etcd.endpoints = [e.strip() for e in etcd.split(",") if e.strip()]
    if host is not None:
        settings.server.host = host
    if port is not None:
        settings.server.port = port
    if data_dir is not None:
        settings.etcd.data_dir = data_dir
    if insecure:
        settings.server.insecure = True
    return settings


def _exit_with(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, no traceback; exit code 2 for configuration errors."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


LogLevelOpt = typer.Option(
    "INFO", "--log-level", callback=level_option, help=f"one of {', '.join(LEVELS)}"
)
LogFormatOpt = typer.Option(
    "text",
    "--log-format",
    envvar="EEP_LOG_FORMAT",
    callback=format_option,
    help="text, or json: one JSON object per line (time, level, logger, message, pid)",
)
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file", envvar="EEP_CONFIG")
EtcdOpt = typer.Option(None, "--etcd", help="etcd endpoints, comma separated; none = embedded etcd")
HostOpt = typer.Option(None, "--host", help="bind address (default 127.0.0.1)")
PortOpt = typer.Option(None, "--port", help="bind port (default 8080; 0 = any free port)")
DataDirOpt = typer.Option(None, "--data-dir", help="embedded etcd data directory")
InsecureOpt = typer.Option(
    False, "--insecure", help="allow a non-loopback bind without auth tokens"
)


@app.command()
def serve(
    config: Path | None = ConfigOpt,
    etcd: str | None = EtcdOpt,
    host: str | None = HostOpt,
    port: int | None = PortOpt,
    data_dir: Path | None = DataDirOpt,
    insecure: bool = InsecureOpt,
    log_level: str = LogLevelOpt,
    log_format: str = LogFormatOpt,
) -> None:
    """Run the controller (and the embedded etcd when no endpoints are configured)."""
    from eep_controller.cli.runtime import ControllerRuntime
    from eep_controller.store import DataDirInUse

    setup_logging(log_level, log_format)
    settings = _settings(config, etcd, host, port, data_dir, insecure)

    def ready(url: str) -> None:
        print(f"eep controller ready at {url}  (API docs {url}/docs)", flush=True)

    try:
        asyncio.run(ControllerRuntime(settings, on_ready=ready).run())
    except DataDirInUse as exc:
        _exit_with(str(exc), 1)


@app.command("config")
def show_config(
    config: Path | None = ConfigOpt,
    etcd: str | None = EtcdOpt,
    host: str | None = HostOpt,
    port: int | None = PortOpt,
    data_dir: Path | None = DataDirOpt,
    insecure: bool = InsecureOpt,
) -> None:
    """Print the effective configuration (secrets masked) as JSON."""
    settings = _settings(config, etcd, host, port, data_dir, insecure)
    typer.echo(json.dumps(settings.masked(), indent=2))


@app.command()
def demo(
    scale: str = typer.Option(
        "2,4,3", "--scale", help="dp sizes: bring up at the first, then scale to each"
    ),
    exit_when_done: bool = typer.Option(
        False, "--exit", help="exit when done (non-zero if anything failed)"
    ),
    json_summary: bool = typer.Option(
        False, "--json", help="print one JSON summary line at the end"
    ),
    agents: int = typer.Option(2, "--agents", min=1, max=16),
    devices_per_agent: int = typer.Option(2, "--devices-per-agent", min=1, max=16),
    port: int = typer.Option(0, "--port", help="controller port (0 = any free port)"),
    state_dir: Path | None = typer.Option(
        None, "--state-dir", help="keep etcd data, logs and checkpoint here"
    ),
    log_level: str = typer.Option("WARNING", "--log-level", callback=level_option),
) -> None:
    """Run the scaling demo: embedded etcd, controller, local agents, probes, scale steps."""
    from eep_controller.cli.demo import DemoConfig, run_demo

    setup_logging(log_level)
    try:
        sizes = [int(x) for x in scale.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter("--scale takes comma-separated integers, e.g. 2,4,3") from None
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter("--scale needs positive dp sizes, e.g. 2,4,3")
    cfg = DemoConfig(
        scale=sizes,
        agents=agents,
        devices_per_agent=devices_per_agent,
        port=port,
        state_dir=state_dir,
        exit_when_done=exit_when_done,
        json_summary=json_summary,
    )
    raise typer.Exit(run_demo(cfg))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
