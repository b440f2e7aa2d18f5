"""`python -m vmm` runs the CLI."""

from vmm.tools.cli import main

main()
