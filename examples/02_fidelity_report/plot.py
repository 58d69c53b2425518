#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Plots acc_retention and top1_agreement against ffn_flops_fraction from factorllm_fidelity_report's CSV.

Usage: python3 plot.py [fidelity_report.csv] [-o fidelity_report.png]

One panel per metric. Each (N, shared, partition, router, recovery) recipe is one line over its FFN budgets;
the dense model is the point (1, 1). Needs matplotlib (Debian: apt-get install python3-matplotlib).
"""

import argparse
import csv
import os
import sys
from collections import defaultdict

COLUMNS = [
    "config", "N", "K", "shared", "partition", "router", "recovery", "ffn_flops_fraction", "top1_agreement",
    "next_token_acc", "acc_retention", "ppl", "ppl_dense", "kl_to_dense",
]


def read_rows(path):
    """Returns the CSV rows as dicts, after checking the header is the report's."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            sys.exit(f"plot.py: {path} has columns {reader.fieldnames}, expected {COLUMNS}")
        return list(reader)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", default="fidelity_report.csv")
    parser.add_argument("-o", "--output", default=None, help="PNG path (default: the CSV path with .png)")
    parser.add_argument("--all", action="store_true",
                        help="draw every recipe as a line (default: co-activation recipes and the baseline as lines, "
                             "the other partitions as grey points)")
    args = parser.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        # Debian's python3-matplotlib belongs to Debian's interpreter; another python3 first on PATH (pyenv, venv)
        # does not see it, so hand over to /usr/bin/python3 once before giving up.
        debian = "/usr/bin/python3"
        if os.path.realpath(sys.executable) != os.path.realpath(debian) and os.path.exists(debian) \
                and not os.environ.get("FLLM_PLOT_REEXEC"):
            os.environ["FLLM_PLOT_REEXEC"] = "1"
            os.execv(debian, [debian, os.path.abspath(__file__)] + sys.argv[1:])
        sys.exit("plot.py: matplotlib is missing; install it with: sudo apt-get install python3-matplotlib")

    rows = read_rows(args.csv)
    if not rows:
        sys.exit(f"plot.py: {args.csv} has no rows")
    output = args.output or (args.csv[:-4] if args.csv.endswith(".csv") else args.csv) + ".png"

    # A recipe = everything but K; its points are the budgets it was run at.
    series = defaultdict(list)
    for r in rows:
        key = (int(r["N"]), int(r["shared"]), r["partition"], r["router"], r["recovery"])
        series[key].append((float(r["ffn_flops_fraction"]), float(r["acc_retention"]), float(r["top1_agreement"])))

    # Highlighted: every recipe on the co-activation partition (the best), the paper-like baseline (contiguous
    # partition, random router, no recovery), the N = 2 / N = 8 / shared-expert variants and the end-to-end
    # fine-tuned rows of examples/03_finetune_recipe (recovery = finetune); every other row is a
    # grey point, so the legend stays readable with the full grid.
    def highlighted(key):
        n, shared, part, router, rec = key
        return args.all or part == "cluster_activations" or rec == "finetune" or (
            part == "contiguous" and router == "random_init" and rec == "none")

    recoveries = sorted({k[4] for k in series})
    colors = {rec: plt.cm.tab10(i) for i, rec in enumerate(recoveries)}
    markers = {"random_init": "o", "par_trained": "s", "par_subset": "^"}

    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5), sharex=True)
    for ax, idx, title in ((axes[0], 1, "acc_retention (next-token accuracy / dense)"),
                           (axes[1], 2, "top1_agreement with the dense model")):
        grey = [p for key, pts in series.items() if not highlighted(key) for p in pts]
        if grey:
            ax.scatter([p[0] for p in grey], [p[idx] for p in grey], s=12, color="0.7", label="other partitions")
        for key, pts in sorted(series.items()):
            if not highlighted(key):
                continue
            n, shared, part, router, rec = key
            pts.sort()
            style = "-" if n == 4 and not shared else "--"
            label = f"N{n}{' S' + str(shared) if shared else ''} {part} {router} {rec}"
            ax.plot([p[0] for p in pts], [p[idx] for p in pts], style, marker=markers.get(router, "D"),
                    color=colors[rec], alpha=0.85, markersize=6 if n == 4 and not shared else 8, linewidth=1.2,
                    label=label)
        ax.plot([1.0], [1.0], "k*", markersize=12, label="dense")
        if idx == 1:
            for frac, target in ((0.25, 0.55), (0.5, 0.70), (0.75, 0.85)):
                ax.plot([frac - 0.04, frac + 0.04], [target, target], "r--", linewidth=1.5)
            ax.text(0.21, 0.57, "targets", color="r", fontsize=8)
        ax.set_xlabel("FFN FLOPs fraction (experts run per token / dense)")
        ax.set_title(title)
        ax.set_xlim(0.15, 1.05)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle("stories260K: K-of-N MoE conversion (layer-local, and end-to-end finetune rows), held-out fidelity\n"
                 "color = recovery; marker = router (o random, s PAR labels, ^ PAR subset labels); "
                 "dashed = N 2 / N 8 / shared expert; red = targets")
    fig.tight_layout(rect=(0, 0.25, 1, 0.95))
    fig.savefig(output, dpi=120)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
