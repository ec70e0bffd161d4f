"""Cheap backend probes (parse time) and the backend rule's body.

`probe_lane` runs while Snakemake builds the DAG, so it must stay cheap and import nothing heavy:
it looks at files (does the library exist, which version/revision) and returns a deterministic
string. The backend rule takes it as a param, so a vanished or changed backend reruns that rule,
and that rerun is the repair. The real work lives in parity_both.provision.backends.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def probe_lane(lane: str, config: Mapping[str, Any] | None = None) -> tuple[str, bool]:
    """(the stable identity of the expected backend as a deterministic string, is it present now?).

    The string is identical before and after a successful repair (so a repair does not make the next
    run redo everything); a change of version/revision/flags changes it and reruns the backend rule.
    A vanished backend is handled by the caller: it removes the rule's output, so the rule reruns."""
    from parity_both.provision import backends

    probe = backends.probe_lane(lane, config=config)
    return json.dumps(backends.stable_probe(probe), sort_keys=True), bool(probe.get("present"))


def probe_lane_text(lane: str, config: Mapping[str, Any] | None = None) -> str:
    """The probe stamp's content: the stable identity of the expected backend plus whether it is
    present now (deterministic JSON)."""
    stable, present = probe_lane(lane, config)
    return json.dumps({"expected": json.loads(stable), "present": present}, sort_keys=True, indent=1) + "\n"


def write_if_changed(path: str, text: str) -> bool:
    """Write text to path atomically, only if the content differs (so mtimes move only on change)."""
    import os
    from pathlib import Path

    p = Path(path)
    try:
        if p.read_text() == text:
            return False
    except OSError:
        pass
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, p)
    return True


def loads_bitnet_format(lane: str, config: Mapping[str, Any] | None = None) -> bool:
    """Can this lane's engine load BitNet.cpp-format models (I2_S, the fork's key prefix)? Only a
    BitNet.cpp build can; mainline llama.cpp refuses type 36 and the `bitnet-b1.58` prefix."""
    from parity_both.provision import backends

    try:
        return backends.lane_spec(lane, config).recipe == "bitnet"
    except backends.BackendFailure:
        return False


def provision_lane(lane: str, stamp: str, repair: str, repair_why: str, log_path: str, threads: int,
                   config: Mapping[str, Any] | None = None) -> dict:
    """The backend job: provision if needed (and allowed), then refresh the probe stamp so the next
    run sees the backend present and has nothing to do."""
    from parity_both.provision import backends

    record = backends.provision_lane(lane, None, repair=repair, repair_why=repair_why,
                                     log_path=log_path, threads=threads, config=config)
    write_if_changed(stamp, probe_lane_text(lane, config))
    return record
