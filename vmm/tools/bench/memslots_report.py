"""`vmm bench memslots`'s output: the table, the headline ratio, the slot limit, and the plot
(matplotlib, the optional 'plot' extra, imported only when --plot asks for it)."""

from __future__ import annotations

from vmm.errors import VmmError
from vmm.tools.units import human_size

from .memslots import LANES, UNITS


def format_table(result: dict) -> str:
    """The figures as a table, the headline ratio and the slot limit."""
    host = result["host"]
    lines = [] if result.get("complete") else ["PARTIAL result: the run stopped before every point"]
    lines += [
        f"memslots vs attributes: {human_size(result['size'])} in {LANES} slots, {result['rounds']} round trips "
        f"per thread, median of {result['repeats']}; host {host['kernel']}, {host['cpus']} CPUs",
        f"{'way':12}{'unit':>5}{'vcpus':>6}{'slots':>6}{'thr':>4}{'µs/conv':>10}{'conv/s':>9}"
        f"{'stall':>7}{'mmio':>6}{'tlbfl/conv':>11}{'faults/conv':>12}",
    ]
    for p in result["points"]:
        for w in result["ways"]:
            x = p[w]
            stall = "-" if x["stall"] is None else f"{x['stall'] * 100:.0f}%"
            lines.append(
                f"{w:12}{p['unit']:>5}{p['vcpus']:>6}{p['slots']:>6}{p['threads']:>4}{x['us_per_conversion']:10.0f}"
                f"{x['conversions_per_s']:9.0f}{stall:>7}{x['mmio_exits']:6}{x['remote_tlb_flush']:11.2f}"
                f"{x.get('vcpu_faults', 0):12.1f}"
            )
    for h in result.get("headline", []):
        lines.append(
            f"{h['unit']}: memslots / attributes = {h['ratio']:.1f}x per conversion at {h['slots']} other slots, "
            f"{h['vcpus']} vCPUs running"
        )
    sl = result["slot_limit"]
    worst = ", ".join(f"{k} units {v:,}" for k, v in sl["worst_case_slots"].items())
    lines.append(
        f"slot limit: KVM_CAP_NR_MEMSLOTS {sl['nr_memslots']:,} (slot {sl['nr_memslots']} refused: "
        f"{sl['slot_past_limit_refused'] or 'NO'}); every other unit private needs {worst} slots"
    )
    for w, per in result.get("slot_creation_us", {}).items():
        lines.append(f"slot creation ({w}): " + ", ".join(f"{v:.0f} µs at {k}" for k, v in per.items()))
    return "\n".join(lines)


def require_matplotlib() -> None:
    """Refuse --plot up front (before minutes of measuring) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise VmmError("--plot needs matplotlib (the 'plot' extra: pip install 'vmm-gmem[plot]')") from None


def plot(result: dict, path: str) -> None:
    """µs per conversion and vCPU stall against the number of other memslots (threads=1, N vCPUs
    touching), one line per way and unit, as SVG (or any format matplotlib infers from ``path``)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    n = result["n_vcpus"]
    for w in result["ways"]:
        for label in UNITS:
            pts = sorted(
                (p for p in result["points"] if p["unit"] == label and p["threads"] == 1 and p["vcpus"] == n),
                key=lambda p: p["slots"],
            )
            if not pts:
                continue
            xs = [p["slots"] for p in pts]
            ax1.plot(xs, [p[w]["us_per_conversion"] for p in pts], marker="o", label=f"{w} {label}")
            ax2.plot(xs, [100 * (p[w]["stall"] or 0) for p in pts], marker="o", label=f"{w} {label}")
    for ax, what in ((ax1, "µs per conversion"), (ax2, f"vCPU stall, % ({n} vCPUs touching)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("other memslots")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.suptitle(f"memslots vs attributes, {n} vCPUs running ({result['host']['kernel']})")
    fig.tight_layout()
    fig.savefig(path)
