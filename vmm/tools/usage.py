"""How every `vmm` command ends on a user mistake: one line on stderr and a documented exit code."""

from __future__ import annotations

import sys
from typing import NoReturn

import click

# exit codes of `vmm boot` (the guest's verdict) and of every usage error
EXIT_PASSED, EXIT_ASSERT, EXIT_USAGE, EXIT_UNEXPECTED, EXIT_TIMEOUT = 0, 1, 2, 3, 4


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one line on stderr and exit with ``code``."""
    click.echo(f"vmm: {message}", err=True)
    sys.exit(code)
