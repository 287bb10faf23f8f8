"""The report's picture: training curves above a timeline of the run (SPEC 10).

matplotlib is imported here only, inside draw(), with the Agg backend: the supervisor
itself never pays for it, and an install without the [report] extra still prints the
text summary. Everything drawn comes from summary.py's summary, timeline and curves,
already checked there: nothing here reads a file or trusts a field.
"""
from __future__ import annotations

import math
import os
from datetime import datetime

WIDTH_IN, HEIGHT_IN, DPI = 12, 8, 100  # 1200 x 800 pixels: small, and readable on a laptop
MAX_CURVE_POINTS = 5000  # a million logged steps are drawn as this many
STALL_RED = "#d62728"
LANES = ["supervisor", "heartbeats", "output", "progress", "attempts"]  # bottom to top; an empty lane is left out
# The attempts lane, coloured by where the time went (goodput.py).
CATEGORY_COLORS = {"productive": "#74c476", "startup": "#fdd0a2", "hung": STALL_RED, "recovery": "#969696",
                   "redone": "#9e9ac8"}
SLOW_SHADE = "#fdae6b"


class MatplotlibMissing(ImportError):
    """matplotlib could not be imported (the [report] extra is not installed)."""


def draw(path: str, title: str, text: str, tl: dict, loss_curves: dict) -> None:
    """Write the report PNG to `path` (atomically): the loss curves (else `text`) on top, then memory and
    speed over time when the run has them, then the timeline, on one clock axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a training box; must precede pyplot
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MatplotlibMissing(str(e)) from e

    over_time = [name for name in ("memory", "rate") if tl.get(name)]
    lanes = _lanes(tl)
    heights = [3.0] + [1.0] * len(over_time) + [0.7 + 0.3 * max(len(lanes), 1)]
    fig = plt.figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(heights), 1, gridspec_kw={"height_ratios": heights})
    top, bottom = axes[0], axes[-1]
    fig.suptitle(title, fontsize=11)
    if not _curves(top, loss_curves):
        _text_panel(top, text)
    for ax, name in zip(axes[1:-1], over_time):
        ax.sharex(bottom)
        (_memory if name == "memory" else _rate)(ax, tl, mdates)
    _timeline(bottom, tl, lanes, mdates)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=DPI)  # then rename, so a viewer never opens half a PNG
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _lanes(tl: dict) -> list[str]:
    """The timeline's lanes that have something to show, bottom to top."""
    if not tl:
        return []
    has = {"supervisor": tl["signals"] or tl["restarts"] or tl["troubles"] or tl["exit"],
           "heartbeats": tl["heartbeats"], "output": tl["silences"], "progress": tl["progress"],
           "attempts": tl["attempts"]}
    return [name for name in LANES if has[name]]


def _x(t: float, mdates) -> float:
    return mdates.date2num(datetime.fromtimestamp(t, datetime.now().astimezone().tzinfo))


def _shade_slow(ax, tl: dict, mdates, label: bool) -> None:
    for i, (a, b) in enumerate(tl.get("slow", [])):
        ax.axvspan(_x(a, mdates), _x(b, mdates), color=SLOW_SHADE, alpha=0.3, lw=0,
                   label="SLOW" if label and i == 0 else None)


def _memory(ax, tl: dict, mdates) -> None:
    """The process tree's RSS over time (samples, heartbeats, diagnoses)."""
    points = tl["memory"]
    unit, size = ("GiB", 1 << 30) if max(v for _, v in points) >= 1 << 30 else ("MiB", 1 << 20)
    ax.plot([_x(t, mdates) for t, _ in points], [v / size for _, v in points], color="#6a51a3", lw=1.2,
            marker="." if len(points) < 60 else None, label="RSS of the process tree")
    _shade_slow(ax, tl, mdates, label=False)
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"memory ({unit})", fontsize=9)
    ax.tick_params(labelbottom=False, labelsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)


def _rate(ax, tl: dict, mdates) -> None:
    """Training speed (steps/s) over time, SLOW episodes shaded."""
    points = tl["rate"]
    ax.plot([_x(t, mdates) for t, _ in points], [math.nan if v is None else v for _, v in points],
            color="#238b45", lw=1.2, label="steps/s")
    _shade_slow(ax, tl, mdates, label=True)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("steps/s", fontsize=9)
    ax.tick_params(labelbottom=False, labelsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)


def _thin(points: list) -> list:
    if len(points) <= MAX_CURVE_POINTS:
        return points
    return points[:: len(points) // MAX_CURVE_POINTS + 1] + [points[-1]]


def _curves(ax, data: dict) -> bool:
    """Train loss per logged step, val loss at each epoch's last step; False when there is nothing to draw."""
    from matplotlib.ticker import FuncFormatter  # matplotlib is known to import by now

    train, val = _thin(data["train"]), data["val"]
    if not train and not val:
        return False
    if train:
        ax.plot(*zip(*train), color="#1f77b4", lw=1.2, marker="." if len(train) < 60 else None, label="train loss (logged steps)")
    if val:
        ax.plot(*zip(*val), color="#ff7f0e", lw=1.5, marker="o", label="val loss (epoch ends)")
    for i, step in enumerate(data["restart_steps"]):
        ax.axvline(step, color="#555555", ls="--", lw=0.7, alpha=0.7, label="restart" if i == 0 else None)
    values = [v for _, v in train + val]
    if min(values) > 0 and max(values) / min(values) >= 5:
        ax.set_yscale("log")  # losses fall by orders of magnitude: a linear axis hides the tail
        # 0.04, not 4x10^-2; within two decades also 2, 3 and 5 of each, so the tail can be read.
        few_decades = max(values) / min(values) < 100
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if few_decades and _mantissa(v) in (2, 3, 5) else ""))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    return True


def _text_panel(ax, text: str) -> None:
    """No metrics.jsonl (a supervisor-only job): show the summary's main lines instead of curves."""
    lines = text.splitlines()[:22]
    ax.axis("off")
    ax.text(0.0, 1.0, "no metrics.jsonl: the run's summary\n\n" + "\n".join(line[:150] for line in lines),
            va="top", ha="left", family="monospace", fontsize=8.5, transform=ax.transAxes)


def _timeline(ax, tl: dict, lanes: list[str], mdates) -> None:
    """Lanes on a clock axis: attempts (coloured by where the time went), progress ticks, silences,
    heartbeats, then stalls, kills, exit. Only lanes with something in them are drawn."""
    from matplotlib.patches import Patch

    tz = datetime.now().astimezone().tzinfo
    lane = {name: i for i, name in enumerate(lanes)}
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_ylim(-0.7, max(len(lanes), 1) - 0.3)
    if not tl:
        ax.text(0.5, 0.5, "no events: nothing to draw a timeline from", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        return

    def x(t: float) -> float:
        return mdates.date2num(datetime.fromtimestamp(t, tz))

    def span(t0: float, t1: float) -> tuple[float, float]:
        return x(t0), max(x(t1) - x(t0), 0.0)

    handles = []
    if "attempts" in lane:
        y = lane["attempts"]
        if tl.get("segments"):
            for category, color in CATEGORY_COLORS.items():
                spans = [span(a, b) for a, b, cat in tl["segments"] if cat == category]
                if spans:
                    ax.broken_barh(spans, (y - 0.3, 0.6), color=color)
                    handles.append(Patch(color=color, label="working" if category == "productive" else category))
            for t0, t1, number in tl["attempts"]:
                ax.broken_barh([span(t0, t1)], (y - 0.3, 0.6), facecolor="none", edgecolor="#525252", lw=0.8)
        else:
            colors = ["#9ecae1", "#c6dbef"]
            for i, (t0, t1, number) in enumerate(tl["attempts"]):
                ax.broken_barh([span(t0, t1)], (y - 0.3, 0.6), color=colors[i % 2], edgecolor="#6baed6")
        for t0, t1, number in tl["attempts"]:
            ax.text(x(t0), y + 0.42, f"#{number}", va="center", ha="left", fontsize=8, clip_on=True)
    if "progress" in lane:
        ax.plot([x(t) for t in tl["progress"]], [lane["progress"]] * len(tl["progress"]), "|", color="#2ca02c",
                ms=14, label="progress update")
    if "output" in lane:
        ax.broken_barh([span(a, b) for a, b in tl["silences"]], (lane["output"] - 0.3, 0.6), color="#bdbdbd",
                       label="no output (from heartbeats)")
    if "heartbeats" in lane:
        ax.plot([x(t) for t in tl["heartbeats"]], [lane["heartbeats"]] * len(tl["heartbeats"]), ".",
                color="#7f7f7f", ms=3, label="heartbeat")
    for i, t in enumerate(tl["stalls"]):
        ax.axvline(x(t), color=STALL_RED, lw=1.5, alpha=0.8, label="stall" if i == 0 else None)
    if "supervisor" in lane:
        y = lane["supervisor"]
        kills = [t for t, name in tl["signals"]]
        if kills:
            ax.plot([x(t) for t in kills], [y + 0.22] * len(kills), "v", color="#8c2d04", ms=7,
                    label="signal (TERM/ABRT/KILL)")
        if tl["restarts"]:
            ax.plot([x(t) for t in tl["restarts"]], [y - 0.22] * len(tl["restarts"]), "o",
                    color="#08519c", ms=7, label="restart")
        if tl["troubles"]:
            ax.plot([x(t) for t, _ in tl["troubles"]], [y] * len(tl["troubles"]), "^",
                    color="#6a3d9a", ms=7, label="orphans/unkillable/failures")
        if tl["exit"]:
            t, status, reason = tl["exit"]
            ax.plot([x(t)], [y], "s", color="#2ca02c" if status == 0 else "black", ms=9,
                    label=f"exit {status} ({reason})")
    if tl["now"]:
        ax.axvline(x(tl["now"]), color="#2ca02c", ls=":", lw=1.2, label="now (still running)")
    pad = (tl["end"] - tl["start"]) * 0.02
    ax.set_xlim(x(tl["start"] - pad), x(tl["end"] + pad))
    locator = mdates.AutoDateLocator(tz=tz, minticks=4, maxticks=10)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=tz))
    offset = datetime.now().astimezone().strftime("%z")
    ax.set_xlabel(f"local time (UTC{offset[:3]}:{offset[3:]})")
    ax.grid(True, axis="x", alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    ax.legend(handles=handles + lines, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False,
              ncol=1)


def _mantissa(value: float) -> float:
    return round(value / 10 ** math.floor(math.log10(value)), 6) if value > 0 else 0.0
