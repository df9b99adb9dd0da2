"""`--version` for eep's command-line programs (eepctl, eep-controller, eep-agent)."""

from __future__ import annotations

from typing import Any

import typer

from eep_controller import __version__


def version_option(program: str) -> Any:
    """A `--version` option that prints "`program` <version>" and exits."""

    def show(value: bool) -> None:
        if value:
            typer.echo(f"{program} {__version__}")
            raise typer.Exit()

    return typer.Option(
        False, "--version", callback=show, is_eager=True, help="print the version and exit"
    )
