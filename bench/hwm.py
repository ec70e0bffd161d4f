"""Run a Python module (-m) or code (-c) in this process, then write its wall time and its own peak
RSS (VmHWM from /proc/self/status) to a JSON file: getrusage of a forked child would include the
parent's pages it inherited before exec.

    python bench/hwm.py OUT.json -m parity_both.fixtures --arch ...
    python bench/hwm.py OUT.json -c "code"
"""

from __future__ import annotations

import json
import runpy
import sys
import time


def vmhwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> int:
    out, kind, target, *args = sys.argv[1:]
    t0 = time.perf_counter()
    rc = 0
    try:
        if kind == "-m":
            sys.argv = [target, *args]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *args]
            exec(compile(target, "<bench -c>", "exec"), {"__name__": "__main__"})  # noqa: S102 - bench code
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    with open(out, "w") as fh:
        json.dump({"wall_s": time.perf_counter() - t0, "vmhwm_mb": vmhwm_mb(), "rc": rc}, fh)
    return rc


if __name__ == "__main__":
    sys.exit(main())
