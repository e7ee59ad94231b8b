"""What the bench/ figures share (imported by plot_scale.py and plot_rollout.py, run by whichever
Python has matplotlib)."""


def log_log(ax, xlabel, title, xbase=10):
    """Log-log axes with a grid and a legend: every bench figure's panels."""
    ax.set_xscale("log", base=xbase)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def finish(fig, title, out):
    """Title, layout and save: the end of every bench figure."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def cli(main, doc):
    """`SCRIPT DATA.json OUT.png`: call main(data, out), or print the usage."""
    import sys

    if len(sys.argv) != 3:
        sys.exit(doc)
    main(sys.argv[1], sys.argv[2])
