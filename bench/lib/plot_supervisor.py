#!/usr/bin/env python3
"""The figure of bench/supervisor: the supervisor's CPU per event against N, log-log.

Usage: plot_supervisor.py DATA.json OUT.png

Run as a separate process by bench/supervisor with whichever Python has matplotlib. DATA.json is
what `bench/supervisor --json` writes: {"command": "...", "rows": [{"workers": N,
"full_respawn_us": ..., "incremental_respawn_us": ..., "full_beat_us": ...,
"incremental_beat_us": ..., "full_rollout_us": ..., "incremental_rollout_us": ...}, ...]}.
Left: a respawn cycle (three events), settling in full after every event and as the supervisor
does now. Middle: a rolling restart, per replaced worker. Right: a heartbeat.
"""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from plotting import cli, finish, log_log  # noqa: E402


def main(data_path, out):
    with open(data_path) as f:
        rows = json.load(f)["rows"]
    xs = [r["workers"] for r in rows]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 5))
    panels = ((left, "respawn", "respawn cycle (µs)"), (middle, "rollout", "rolling restart, per worker (µs)"),
              (right, "beat", "heartbeat (µs)"))
    for ax, kind, title in panels:
        full = "settle in full after every event" + (" (no quiet path either)" if kind == "beat" else "")
        ax.plot(xs, [r[f"full_{kind}_us"] for r in rows], "o--", color="C3", label=full)
        ax.plot(xs, [r[f"incremental_{kind}_us"] for r in rows], "o-", color="C0", label="now (incremental settle)")
        log_log(ax, "workers (N)", title, xbase=2)
    finish(fig, "ecewo-cluster: the supervisor's own CPU per event against N (log-log)", out)


if __name__ == "__main__":
    cli(main, __doc__)
