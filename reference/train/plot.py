"""Every channel's loss curve and the global curve, overlaid in one PNG."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_channel_loss(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Draw the JSONL records of a run (`{"step": ..., **ChannelLossReport.to_json()}`) to `path`."""
    # The object API, not pyplot: no global backend switch, nothing left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = sorted({name for r in records for name in r["channels"]})
    for name in names:
        points = [(r["step"], r["channels"][name]["loss"]) for r in records if name in r["channels"]]
        steps, losses = zip(*points, strict=True)
        ax.plot(steps, losses, linewidth=1.2, alpha=0.85, label=name)
    steps = [r["step"] for r in records]
    losses = [math.nan if r["loss"] is None else r["loss"] for r in records]  # null: no tokens
    ax.plot(steps, losses, color="black", linewidth=2.4, label="global")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean token loss")
    ax.set_title("Channel loss (token-weighted; channels add up to the global loss)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small", ncol=2 if len(names) > 6 else 1)
    fig.tight_layout()
    fig.savefig(path)
