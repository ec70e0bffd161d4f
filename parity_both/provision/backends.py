"""Probe or provision one backend (a lane's engine) from the command line.

The command line (for the repair hint; exit status = failure code) and the public names callers use,
re-exported from the provisioning modules (listed in parity_both/provision/__init__.py)::

    python -m parity_both.provision.backends probe NAME [--cache-dir D] [--config BACKENDS.json] [--out F]
    python -m parity_both.provision.backends provision NAME [--cache-dir D] [--log L] [--out ID.json]
        [--repair auto|never|always|default] [--config BACKENDS.json] [--jobs N]

A failed ``provision`` writes the failure record (parity_both.jobs.failure_record) beside the log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from parity_both.hashing import cache_dir as default_cache_dir
from parity_both.jobs import failure_record, failure_record_path, write_failure_record
from parity_both.provision.failures import BackendFailure
from parity_both.provision.probes import probe_backend, probe_lane, stable_probe
from parity_both.provision.provision import (
    build_log_path,
    provision_backend,
    provision_lane,
    resolve_repair_mode,
)
from parity_both.provision.specs import BUILTIN_SPECS, BackendSpec, SourceSpec, lane_spec, spec_from_config

__all__ = [
    "BUILTIN_SPECS",
    "BackendFailure",
    "BackendSpec",
    "SourceSpec",
    "build_log_path",
    "lane_spec",
    "main",
    "probe_backend",
    "probe_lane",
    "provision_backend",
    "provision_lane",
    "resolve_repair_mode",
    "spec_from_config",
    "stable_probe",
]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity_both.provision.backends", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("probe", "provision"):
        p = sub.add_parser(name)
        p.add_argument("backend")
        p.add_argument("--cache-dir", type=Path, default=None)
        p.add_argument("--config", type=Path, default=None, help="JSON file: {backend name: spec mapping}")
        p.add_argument("--out", type=Path, default=None, help="write the JSON result here (atomically)")
        if name == "provision":
            p.add_argument("--log", type=Path, default=None)
            p.add_argument("--repair", default="default", choices=("auto", "never", "always", "default"))
            p.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    cfg = json.loads(a.config.read_text()).get(a.backend) if a.config else None
    cache_dir = a.cache_dir or default_cache_dir()
    log_path = getattr(a, "log", None) or (cache_dir / "logs" / f"{a.backend}.log")
    try:
        spec = spec_from_config(a.backend, cfg)
        if a.cmd == "probe":
            result = probe_backend(spec, cache_dir)
        else:
            mode = resolve_repair_mode(a.repair, requested_by="set by --repair")
            result = provision_backend(spec, cache_dir, log_path, mode, jobs=a.jobs)
            failure_record_path(log_path).unlink(missing_ok=True)
    except BackendFailure as f:
        f.backend = f.backend or a.backend
        if a.cmd == "provision":
            rec = write_failure_record(log_path, failure_record(f, log=log_path))
            print(f"{f}\nfailure record: {rec}", file=sys.stderr)
        else:
            print(str(f), file=sys.stderr)
        return f.code
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_name(a.out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, a.out)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
