"""What a plan round costs the process that syncs: ``InProcessDispatcher.submit`` of one
compaction per tenant for three plans (a 5-minute boundary: level 1, level 2, retention)
over TENANTS tenants, with the job blocked so that only the hand-over is timed; one job per
tenant (as before adde0c2) and STORAGE_BATCH tenants per job (the embedded default).

    python bench/plan_round.py [--tenants 10000]
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from scheduler.dispatch import STORAGE_BATCH, InProcessDispatcher


def submit_time(names: list[str], batched: bool) -> float:
    gate = threading.Event()
    dispatcher = InProcessDispatcher({"compact": lambda *_, **__: gate.wait() and {}}, workers=1,
                                     batched=("compact",) if batched else ())
    try:
        t = time.perf_counter()
        for level in (1, 2, 3):
            dispatcher.submit("compact", names, level=level)
        return time.perf_counter() - t
    finally:
        gate.set()
        dispatcher.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tenants", type=int, default=10_000)
    a = p.parse_args()
    names = [f"t{i:05d}.db" for i in range(a.tenants)]
    print(json.dumps({"jobs": 3 * a.tenants, "one_per_tenant_s": round(submit_time(names, False), 3),
                      f"batched_{STORAGE_BATCH}_s": round(submit_time(names, True), 3)}))


if __name__ == "__main__":
    main()
