"""`vmm trace`: the click command (parse, trace, print)."""

from __future__ import annotations

import signal
import sys
from contextlib import ExitStack

import click

from vmm.tools.usage import fail

from . import CATEGORIES


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "-p", "--pid", type=click.IntRange(1), default=None, help="Attach to this running process (all its threads)."
)
@click.option("--summary", "show_summary", is_flag=True, help="Print the summary at the end.")
@click.option(
    "--json", "json_path", default=None, metavar="FILE", help="Write one JSON object per event, then the summary."
)
@click.option(
    "-o", "--output", "out_path", default=None, metavar="FILE", help="Write the event lines here instead of stderr."
)
@click.option("--only", multiple=True, type=click.Choice(CATEGORIES), help="Show only these events (repeatable).")
@click.option(
    "--vm", "vm_index", type=click.IntRange(0), default=None, help="Show only VM N's events (in creation order)."
)
@click.option("-q", "--quiet", is_flag=True, help="No event lines (with --summary or --json).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def trace(
    pid: int | None,
    show_summary: bool,
    json_path: str | None,
    out_path: str | None,
    only: tuple[str, ...],
    vm_index: int | None,
    quiet: bool,
    command: tuple[str, ...],
) -> None:
    """Trace what a VMM does with KVM and guest memory: `vmm trace [OPTIONS] -- COMMAND [ARGS...]`
    or `vmm trace -p PID`.

    Decodes every KVM ioctl on its fd kind, KVM_RUN exits from the tracee's kvm_run, and the
    memory calls on guest memory (fallocate on guest_memfd and memfd, madvise, munmap) as GPA
    ranges; keeps a model of each VM's memory and warns about double allocation, conversions by
    memslot changes, memslot changes while vCPUs run, unanswered memory faults and private
    attributes without guest_memfd. Lines go to stderr (or -o FILE).

    Exit status: the command's own (128+N when signal N killed it); with -p, 0 after detaching
    (Ctrl-C detaches, leaving the process running) or when the process ended; 2 when the command
    cannot be run or the process cannot be traced (no such process, permission, already traced)."""
    if (pid is None) == (not command):
        fail("trace: give a command after -- or -p PID, not both (try `vmm trace -h`)")
    try:  # python-ptrace is the `trace` extra: import it only when tracing
        from .output import Output, render_summary, summarize
        from .session import Session
        from .tracer import TraceError, Tracer
    except ImportError as e:
        fail(f"trace needs python-ptrace ({e}): pip install 'vmm[trace]'")
    with ExitStack() as stack:
        try:
            text = None if quiet else stack.enter_context(open(out_path, "w", buffering=1)) if out_path else sys.stderr
            json_file = stack.enter_context(open(json_path, "w", buffering=1)) if json_path else None
        except OSError as e:
            fail(f"trace: {e.filename}: {e.strerror}")
        out = Output(text, json_file, only, vm_index)
        session = Session(out)
        tracer = Tracer(session)
        try:
            if pid is not None:
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(s, tracer.request_detach)
                tracer.attach(pid)
            else:
                # Ctrl-C reaches the command through the terminal; the tracer stays to report it
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                tracer.spawn(list(command))
        except TraceError as e:
            fail(f"trace: {e}")
        status = tracer.run()
        summary = summarize(session, session.now())
        out.summary(summary)
        out.flush()
        if show_summary:  # where the event lines go (stderr when they are off)
            (text or sys.stderr).write(render_summary(summary) + "\n")
    sys.exit(0 if pid is not None else status)
