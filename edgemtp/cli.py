"""The ``edgemtp`` command line.

Each command is a thin wrapper: parse flags, call the library, print. Heavy
imports (mlx, onnxruntime, torch) happen inside the commands so that
``edgemtp --help`` stays instant.
"""

from __future__ import annotations

import sys

import typer

from edgemtp.errors import UserError

app = typer.Typer(
    name="edgemtp",
    help="On-device LLM inference with multi-token-prediction (MTP) speculative decoding.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"edgemtp {version('edgemtp')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """On-device LLM inference with multi-token-prediction (MTP) speculative decoding."""


# --- commands -------------------------------------------------------------
# Each command below is a thin wrapper around a library function.


def main() -> None:
    """Console-script entry point: user errors become one line and exit code 2."""
    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
