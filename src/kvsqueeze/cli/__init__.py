"""The `kvsqueeze` command line: commands (app), the entry point (main), rendering."""

from kvsqueeze.cli import distill as _distill  # noqa: F401  (registers distill)
from kvsqueeze.cli import engine as _engine  # noqa: F401  (registers serve and bench-engine)
from kvsqueeze.cli.app import app
from kvsqueeze.cli.main import main, with_bare_ray

__all__ = ["app", "main", "with_bare_ray"]
