"""Fault-injection matrix: SIGKILL `orchestrate run` at each lifecycle point; count leaks.

    python bench/bench_faults.py [--providers vastai,runpod,lambda] [--modes down,watchdog]

Prints: point, provider, mode, whether the kill landed at the point, instances the fake cloud
created, instances still live afterwards (target 0), and (watchdog mode) seconds until nothing
ran. Each cell is a real `orchestrate run` against the fake cloud (real sshd instances).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
from pathlib import Path

from orchestrator.testing.fakecloud import FakeCloud
from orchestrator.testing.faultmatrix import POINTS, cleanup, run_point, table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--providers", default="vastai")
    ap.add_argument("--modes", default="down,watchdog")
    ap.add_argument("--points", default=",".join(POINTS))
    ap.add_argument("--idle-timeout", type=float, default=5.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # SIGTERM unwinds like Ctrl-C, so the fake cloud's sshds and instance processes are shut down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        with FakeCloud(Path(tmp) / "cloud") as fc:
            for provider in args.providers.split(","):
                for mode in args.modes.split(","):
                    for point in args.points.split(","):
                        r = run_point(Path(tmp) / f"{provider}-{mode}-{point}", fc, provider, point, mode,
                                      idle_timeout_s=args.idle_timeout)
                        results.append(r)
                        print(table([r]).splitlines()[-1], flush=True)
                        cleanup(fc)
    print()
    print(table(results))
    tried = len(results)
    created = sum(r.created for r in results)
    leaked = sum(r.leaked for r in results)
    print(f"\npoints tried {tried}, instances created {created}, leaked {leaked}")
    return 0 if leaked == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
