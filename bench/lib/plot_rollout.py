#!/usr/bin/env python3
"""The figure of bench/rollout: a rolling restart's duration against the surge size, log-log.

Usage: plot_rollout.py DATA.json OUT.png

Run as a separate process by bench/rollout with whichever Python has matplotlib. DATA.json is
what `bench/rollout --json` writes: {"command": "...", "rows": [{"workers": N, "surge": S,
"rollout_s": ..., "min_s": ..., "max_s": ..., "ideal_s": ..., "cpu_per_worker_us": ...}, ...]}.
Left: the measured duration (median, with the fastest and slowest rollouts as error bars) and
the best the surge allows (⌈N ÷ S⌉ × the ready delay), one colour per N. Right: the master's CPU
per replaced worker.
"""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from plotting import cli, finish, log_log  # noqa: E402


def main(data_path, out):
    with open(data_path) as f:
        rows = json.load(f)["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for ci, n in enumerate(sorted({r["workers"] for r in rows})):
        rs = sorted((r for r in rows if r["workers"] == n), key=lambda r: r["surge"])
        xs = [r["surge"] for r in rs]
        ys = [r["rollout_s"] for r in rs]
        err = [[y - r["min_s"] for y, r in zip(ys, rs)], [r["max_s"] - y for y, r in zip(ys, rs)]]
        left.errorbar(xs, ys, yerr=err, color=f"C{ci}", marker="o", capsize=3, label=f"{n} workers: measured")
        left.plot(xs, [r["ideal_s"] for r in rs], ":", color=f"C{ci}", label=f"{n} workers: ⌈N/S⌉ × ready delay")
        right.plot(xs, [r["cpu_per_worker_us"] for r in rs], color=f"C{ci}", marker="o", label=f"{n} workers")
    for ax, title in ((left, "rolling restart (s)"), (right, "master CPU per replaced worker (µs)")):
        log_log(ax, "max_surge (slots replaced at once)", title, xbase=2)
    finish(fig, "ecewo-cluster: a rolling restart against the surge size (log-log)", out)


if __name__ == "__main__":
    cli(main, __doc__)
