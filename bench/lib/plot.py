#!/usr/bin/env python3
"""The throughput figure of bench/run: req/s and p99 per system, two bar charts side by side.

Usage: plot.py DATA.json OUT.png

Run as a separate process by bench/run with whichever Python has matplotlib (the one running
bench/run, or Debian's /usr/bin/python3 with python3-matplotlib), so that bench/run itself needs
only the standard library. DATA.json:

    {"title": "...", "subtitle": "...",
     "systems": [{"label": "...", "family": "standalone|reuseport|shared|nginx",
                  "rps": [per-round values], "p99_ms": [per-round values]}, ...]}

Bars are the medians over the rounds; the whiskers span the rounds' minimum to maximum.
"""

import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter  # noqa: E402

COLORS = {
    "standalone": "#7f7f7f",
    "reuseport": "#1f77b4",
    "shared": "#2ca02c",
    "nginx": "#d62728",
}
LEGEND = {
    "standalone": "testbed --standalone (no cluster)",
    "reuseport": "ecewo-cluster, --balance reuseport",
    "shared": "ecewo-cluster, --balance shared",
    "nginx": "nginx, return 200 \"Hello\"",
}


def main(data_path, out_path):
    with open(data_path) as f:
        data = json.load(f)
    systems = data["systems"]
    labels = [s["label"] for s in systems]
    y = list(range(len(systems)))[::-1]  # first system at the top

    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(13, 0.55 * len(systems) + 2.6), sharey=True)
    # p99 on a log scale: one scheduling stall in one round can lift a whisker 100-fold.
    panels = (
        (ax_rps, "rps", 1000.0, "Throughput (k req/s, median of rounds; higher is better)", "{:.0f} k", False),
        (ax_p99, "p99_ms", 1.0, "p99 latency (ms, log scale, median of rounds; lower is better)", "{:.2f} ms", True),
    )
    for ax, key, scale, xlabel, fmt, log in panels:
        meds, lo, hi, colors = [], [], [], []
        for s in systems:
            vals = [v / scale for v in s[key]]
            m = statistics.median(vals)
            meds.append(m)
            lo.append(m - min(vals))
            hi.append(max(vals) - m)
            colors.append(COLORS.get(s["family"], "#999999"))
        ax.barh(y, meds, xerr=[lo, hi], color=colors, height=0.65, capsize=3,
                error_kw={"elinewidth": 1, "ecolor": "#333333"})
        top = max(m + h for m, h in zip(meds, hi)) if meds else 1
        if log:
            ax.set_xscale("log")
            bottom = min(min(s[key]) / scale for s in systems) / 2
            for yi, m, h in zip(y, meds, hi):
                ax.text((m + h) * 1.12, yi, fmt.format(m), va="center", fontsize=9)
            ax.set_xlim(bottom, top * 4)
            ticks = [t for t in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
                     if bottom <= t <= top * 4]
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            for yi, m, h in zip(y, meds, hi):
                ax.text(m + h + top * 0.015, yi, fmt.format(m), va="center", fontsize=9)
            ax.set_xlim(0, top * 1.22)
        ax.set_xlabel(xlabel, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    ax_rps.set_yticks(y)
    ax_rps.set_yticklabels(labels, fontsize=10)

    families = []
    for s in systems:
        if s["family"] not in families:
            families.append(s["family"])
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS.get(f, "#999999")) for f in families]
    fig.legend(handles, [LEGEND.get(f, f) for f in families], loc="lower center", ncol=len(families),
               fontsize=9, frameon=False)
    fig.suptitle(data.get("title", ""), fontsize=12)
    if data.get("subtitle"):
        fig.text(0.5, 0.905, data["subtitle"], ha="center", fontsize=9, color="#444444")
    fig.tight_layout(rect=(0, 0.07, 1, 0.9))
    fig.savefig(out_path, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    main(sys.argv[1], sys.argv[2])
