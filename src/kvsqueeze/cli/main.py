"""The console entry point: argv in, exit code out, every failure as one `error:` line."""

from __future__ import annotations

import sys

import typer

from kvsqueeze.cli.app import app

try:  # recent typer vendors its own click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import UsageError


def with_bare_ray(argv: list[str]) -> list[str]:
    """`--ray` takes an optional ADDRESS: a bare `--ray` means a local Ray."""
    fixed = []
    for i, arg in enumerate(argv):
        fixed.append(arg)
        if arg == "--ray" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            fixed.append("local")
    return fixed


def main(argv: list[str] | None = None) -> None:
    """Run the command line on `argv` (default: sys.argv) and exit with its code."""
    args = sys.argv[1:] if argv is None else argv
    # Usage errors (a mistyped option or value) get the same one-line form as bad input.
    try:
        code = app(args=with_bare_ray(args), prog_name="kvsqueeze", standalone_mode=False)
    except UsageError as err:
        if err.format_message():  # empty when the help was shown for a bare `kvsqueeze`
            typer.echo(f"error: {err.format_message()}", err=True)
        code = 2
    except typer.Abort:
        code = 130
    sys.exit(code or 0)
