"""Run a command and report its wall time and the peak resident memory of its whole process tree.

    python tests/peak_rss.py -- python experiment.py --out_dir=run_0
"""
import subprocess
import sys
import time

from bench_plot import tree_rss


def main():
    command = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peak_total = 0
    while proc.poll() is None:
        peak_total = max(peak_total, tree_rss(proc.pid))
        time.sleep(0.5)
    print(f"peak_rss.py: exit {proc.returncode}, wall {time.perf_counter() - start:.0f} s, peak memory of the "
          f"process tree {peak_total / 2**30:.2f} GiB", file=sys.stderr)
    raise SystemExit(proc.returncode)


if __name__ == "__main__":
    main()
