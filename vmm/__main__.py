"""`python -m vmm` runs the CLI."""

from .cli import main

main()
