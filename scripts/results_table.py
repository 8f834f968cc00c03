"""The README's results table, now ``nrrdd compare`` (nrrdd/compare.py) with this script's old defaults and flags.

    python scripts/results_table.py --teacher runs/teachers/fashion-mnist_conv3_e5_s0/teacher.pt --ipc 10 --seeds 0 1 2
"""
import sys

from nrrdd.cli import main

DEFAULTS = ["--ipcs", "1", "10", "50", "--seeds", "0", "1", "2", "--out", "runs/table",
            "--results", "results/table_fashion-mnist.json"]

if __name__ == "__main__":
    sys.exit(main(["compare", *DEFAULTS, *("--ipcs" if a == "--ipc" else a for a in sys.argv[1:])]))
