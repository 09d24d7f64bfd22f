"""`python -m harness ...` is the `sae-harness` command."""

from harness.cli import main

main()
