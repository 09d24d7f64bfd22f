"""`python -m harness ...` is the `sae-harness` command."""

from harness.cli.app import main

main()
