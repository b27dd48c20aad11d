"""`make test`: the SLURM tests and the rest as two pytest processes side by side, then one verdict.

The tests on the local SLURM cluster (marked ``slurm`` by tests/conftest.py) must run one after another: they cancel
leftover test jobs and count the node's CPUs as their own. They spend most of their time waiting (on sbatch, sacct,
a server outage of 60 s), so the other tests run beside them in a second process. (pytest-xdist's ``loadgroup``
would do this, but its grouping sets ``item._nodeid``, which pytest 9 no longer reads.) Each process writes its own
log; both are printed when both are done, and the exit status is the first non-zero one.

    python tests/run_suites.py [extra pytest args]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMON = ["-q", "-p", "no:cacheprovider", "--durations=30", "-rs"]
SUITES = (("slurm", ["-m", "slurm"]), ("rest", ["-m", "not slurm"]))


def main(argv: list[str]) -> int:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="scaling-unet-tests-") as tmp:
        procs = []
        for name, sel in SUITES:
            log = open(Path(tmp) / f"{name}.log", "w")
            procs.append((name, log, time.monotonic(), subprocess.Popen(
                [sys.executable, "-m", "pytest", *COMMON, *sel, *argv], cwd=REPO, stdout=log,
                stderr=subprocess.STDOUT)))
        codes = []
        for name, log, started, p in procs:
            code = p.wait()
            log.close()
            codes.append(code)
            print(f"\n===== {name} tests: exit {code}, {time.monotonic() - started:.0f} s =====", flush=True)
            print(Path(log.name).read_text(errors="replace"), flush=True)
    # 5: no test selected (e.g. a -k that matches only one suite) is not a failure of the other
    bad = [c for c in codes if c not in (0, 5)]
    print(f"===== both suites done in {time.monotonic() - t0:.0f} s: exit {bad[0] if bad else 0} =====")
    return bad[0] if bad else (0 if 0 in codes else 5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
