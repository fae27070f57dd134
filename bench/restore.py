#!/usr/bin/env python3
"""Restore at the disk's limit: tenantsync, Litestream and the disk's own floor, one run.

    python bench/restore.py                     # 300 MB and 1 GB, 2 rounds, ~6 minutes
    python bench/restore.py --sizes 100 --rounds 1

For each size a database of compressible rows is built (bench/core.py's builder), replicated
once to ``file://`` by each tool (each restores its own replica), and then, per round, in
this order: the floor (the same number of bytes written with 8 MiB pwrites into a new file
on the same filesystem, then one fsync), ``tenantsync restore``, ``litestream restore``.
Each restore is the whole CLI command, output fsynced by the tool, and is compared with the
source. The best round of each is reported, with every round listed, as MB/s (10^6 bytes of
database per second) and as a ratio to the floor's best round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import core  # noqa: E402  (bench/core.py: builder, replicators, CLI restores, floor)


def one_size(bench: core.Bench, size_mb: int, rounds: int, compare: str | None = None) -> dict:
    d = os.path.join(bench.root, f"{size_mb}mb")
    os.makedirs(d)
    src = os.path.join(d, "source.db")
    core.log(f"building a {size_mb} MB database")
    bench.build_big(src, size_mb)
    size = os.path.getsize(src)
    replicas = {tool: bench.replicate_once(tool, src, os.path.join(d, tool))[0] for tool in core.TOOLS}
    out = os.path.join(d, "out.db")
    runs: dict = {"floor": [], **{tool: [] for tool in core.TOOLS}, **({"compare": []} if compare else {})}
    for r in range(rounds):
        load = core.loadavg()
        runs["floor"].append({"seconds": core.write_floor(size, d), "load": load})
        for tool in core.TOOLS:
            load = core.loadavg()
            ru = bench.restore(tool, replicas[tool], out)
            ru["load"] = load
            if r == rounds - 1:
                ru["same_as_source"] = bench.same_content(src, out, tool)
            os.remove(out)
            runs[tool].append(ru)
        if compare:
            load = core.loadavg()
            runs["compare"].append(bench.restore("tenantsync", replicas["tenantsync"], out, checkout=compare) | {"load": load})
            os.remove(out)
        core.log("  round %d: " % (r + 1) + ", ".join(
            f"{k} {v[-1]['seconds']:.2f} s" for k, v in runs.items()))
    shutil.rmtree(d, ignore_errors=True)
    return {"db_bytes": size, "runs": runs}


def report(results: dict) -> str:
    lines = ["| database | disk floor (write + fsync) | tenantsync | Litestream 0.5.17 | tenantsync / floor, best rounds "
             "(median of each round's) | Litestream / floor, same |", "|---|---|---|---|---|---|"]
    compared: list[str] = []
    for size_mb, res in results.items():
        size, runs = res["db_bytes"], res["runs"]
        best = {k: min(x["seconds"] for x in v) for k, v in runs.items()}

        def cell(k):
            every = ", ".join(f"{x['seconds']:.2f}" for x in runs[k])
            check = runs[k][-1].get("same_as_source")
            return f"{best[k]:.2f} s = {size / 1e6 / best[k]:.0f} MB/s ({every})" + (f", {check}" if check else "")
        def paired(k):
            """The floor's best round is often one the disk happened to be idle in: each
            round's own ratio (floor, then the tools, one after another) is reported too."""
            return statistics.median(f["seconds"] / x["seconds"] for f, x in zip(runs["floor"], runs[k]))
        lines.append(f"| {size / 1e6:.0f} MB | {cell('floor')} | {cell('tenantsync')} | {cell('litestream')} | "
                     f"**{best['floor'] / best['tenantsync']:.2f}** ({paired('tenantsync'):.2f}) | "
                     f"{best['floor'] / best['litestream']:.2f} ({paired('litestream'):.2f}) |")
        if "compare" in runs:
            ts, other = ([x["seconds"] for x in runs[k]] for k in ("tenantsync", "compare"))
            compared.append(f"{size / 1e6:.0f} MB: --compare {cell('compare')}, median {statistics.median(other):.2f} s "
                            f"against {statistics.median(ts):.2f} s; this code faster in "
                            f"{sum(a < b for a, b in zip(ts, other))} of {len(ts)} rounds")
    loads = ", ".join(f"{x['load']:.1f}" for res in results.values() for v in res["runs"].values() for x in v)
    lines += [""] + compared + ["", f"Load average (1 min) before each measurement: {loads}"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="300,1024", help="database sizes in MB, comma-separated")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quiet", type=float, default=5, help="seconds of no replica change that end Litestream's startup")
    p.add_argument("--workdir", help="scratch directory on the filesystem to measure (default: under $TMPDIR)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--compare", metavar="CHECKOUT", help="also time `tenantsync restore` by the code in another "
                   "checkout (an earlier commit) in every round, on tenantsync's replica")
    a = p.parse_args()
    import installed  # bench/installed.py
    installed.compile_sources()  # tenantsync's bytecode, as pip would have left it
    if a.compare:
        installed.compile_sources(a.compare)
    bench = core.Bench(argparse.Namespace(workdir=a.workdir or tempfile.mkdtemp(prefix="tenantsync-restore-bench-"),
                                          keep=a.keep, quiet=a.quiet))
    t0 = time.monotonic()
    results = {}
    try:
        for size_mb in (int(x) for x in a.sizes.split(",")):
            results[size_mb] = one_size(bench, size_mb, a.rounds, a.compare)
    finally:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
        if not a.keep:
            shutil.rmtree(bench.root, ignore_errors=True)
    head = subprocess.run(["git", "-C", core.REPO, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    print(f"\n## restore from file://, {(time.monotonic() - t0) / 60:.1f} min, {os.cpu_count()} CPUs, "
          f"tenantsync at {head}\n")
    print(report(results))


if __name__ == "__main__":
    main()
