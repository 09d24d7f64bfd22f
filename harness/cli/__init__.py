"""The `sae-harness` command line: thin typer commands that call the jobs (harness/jobs/)."""

from harness.cli.app import app

__all__ = ["app"]
