#!/usr/bin/env python3
"""The figure of bench/scale: the master's costs against the number of workers, log-log.

Usage: plot_scale.py DATA.json OUT.png

Run as a separate process by bench/scale with whichever Python has matplotlib. DATA.json is what
`bench/scale --json` writes: {"command": "...", "rows": [{"workers": N, ...}, ...]}, or with
several `--testbed`s {"command": "...", "sets": [{"label": L, "rows": [...]}, ...]} (each set is
drawn, under its label). Several data files can be drawn together (before/after a change):
plot_scale.py A.json[=label] B.json[=label] OUT.png. A series keeps its colour across data
sets; each data set has its own line style (solid, dashed, dotted, dash-dot).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from plotting import finish, log_log  # noqa: E402

PANELS = [
    ("Master CPU per worker event (µs)", [
        ("idle_cpu_per_beat_us", "per heartbeat"),
        ("respawn_net_cpu_us", "per respawn (net of heartbeats)"),
        ("restart_net_cpu_per_worker_us", "per replaced worker, restart (net)"),
        ("startup_cpu_per_worker_us", "per worker started"),
    ]),
    ("Control queries", [
        ("status_ms", "status latency (ms)"),
        ("metrics_ms", "metrics latency (ms)"),
        ("status_bytes", "status answer (KB)"),
    ]),
    ("Master footprint", [
        ("rss_kib", "RSS (MiB)"),
        ("fds", "descriptors"),
    ]),
    ("Whole-cluster operations (s)", [
        ("ready_s", "start-up to all ready"),
        ("restart_s", "rolling restart"),
    ]),
]
SCALE = {"status_bytes": 1 / 1000, "rss_kib": 1 / 1024}
STYLES = ["-", "--", ":", "-."]


def main(args):
    out = args[-1]
    sets = []
    for a in args[:-1]:
        path, _, label = a.partition("=")
        with open(path) as f:
            data = json.load(f)
        if "sets" in data:
            sets += [(f"{label} {s['label']}".strip(), s["rows"]) for s in data["sets"]]
        else:
            sets.append((label, data["rows"]))
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, (title, series) in zip(axes.flat, PANELS):
        for si, (label, rows) in enumerate(sets):
            for ki, (key, name) in enumerate(series):
                pts = [(r["workers"], r[key] * SCALE.get(key, 1)) for r in rows if r.get(key)]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                lab = f"{name} ({label})" if label else name
                ax.plot(xs, ys, STYLES[si % len(STYLES)], color=f"C{ki}", marker="o", label=lab)
        log_log(ax, "workers (N)", title)
    finish(fig, "ecewo-cluster: the master's cost against the number of workers (log-log; flat = O(1) per event)", out)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1:])
