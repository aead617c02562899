"""The driver's memory as the input grows: `labelcat run MANIFEST` on manifests of 100k and 1M rows.

What issue 17 asks to show: a night's driver holds one chunk at a time, whatever the input's size. The
manifests name files that do not exist (every row becomes an ``error`` row after the scan has tried to
read it), so the figure is the driver's own bookkeeping per row, not the photos'. The CLI runs in a
fresh process; its peak resident memory (``VmHWM`` in ``/proc/PID/status``, the kernel's own high-water
mark, read every 0.5 s until it exits), the peak of its private part (``RssAnon``) and wall time are
printed as a Markdown table. Ray's workers are other processes and not counted: they are the cluster's,
not the driver's.

Usage: ``python bench/driver_memory.py [--rows 100000 1000000] [--runner ray|local] [--store]
[--chunk-size N]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss(cmd: list[str], env: dict[str, str]) -> tuple[int, int, float, int]:
    """(peak resident bytes, peak private resident bytes, seconds, exit status) of the process.

    ``VmHWM`` is the kernel's high-water mark of all resident pages, including pages of Ray's shared-memory
    object store that the driver has mapped to read blocks (they belong to the node, not to the driver);
    ``RssAnon`` (sampled: the kernel keeps no peak of it) is the driver's own memory.
    """
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = private = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
                elif line.startswith("RssAnon:"):
                    private = max(private, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.5)
    if proc.returncode:
        sys.stderr.write(proc.stderr.read().decode(errors="replace")[-2000:])
    return peak, private, time.perf_counter() - t, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--runner", choices=["ray", "local"], default="ray")
    ap.add_argument("--store", action="store_true", help="with --store (a new store per size)")
    ap.add_argument("--chunk-size", type=int, default=None)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    print("| rows | runner | driver peak RSS | of it private (RssAnon) | wall time |\n|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="labelcat-mem-") as tmp:
        for n in args.rows:
            manifest = Path(tmp) / f"manifest-{n}.csv"
            with open(manifest, "w") as fh:
                fh.write("path,sku,colour\n")
                fh.writelines(f"uploads/{i // 1000:04d}/{i:08d}.jpg,SKU{i:08d},red\n" for i in range(n))
            cmd = [sys.executable, "-m", "pipeline", "run", str(manifest), "--out", str(Path(tmp) / f"out-{n}.parquet"),
                   "-q", "--runner", args.runner]
            if args.store:
                cmd += ["--store", str(Path(tmp) / f"store-{n}")]
            if args.chunk_size:
                cmd += ["--chunk-size", str(args.chunk_size)]
            peak, private, seconds, status = peak_rss(cmd, env)
            print(f"| {n:,} | {args.runner}{' --store' if args.store else ''} | {peak / 2**20:.0f} MiB | "
                  f"{private / 2**20:.0f} MiB | {seconds:.0f} s{'' if status == 0 else f' (exit {status})'} |",
                  flush=True)


if __name__ == "__main__":
    main()
