"""`parity-both diff OLD NEW`: which receipt fields moved between two runs.

OLD and NEW are results folders (or single receipt files). Receipts are paired by their path under the
folder (`{model}/receipts/{lane}/{prompt}.json`), loaded in the current schema (older versions are
upgraded, as `parity-both show` does) and compared field by field. Lists are compared element-wise, so
a field path names every row it applies to (`quantized.rows[].kl` counts the rows that differ).

`--ignore PATH` (repeatable; a dotted prefix such as `graph` or `backend_identity.runtime`) names fields
a change is expected to alter; the run then states whether every pair's content hash (the receipt's own
`content_sha256` rule: everything except timestamps and timings) is identical apart from them.
Exit 0 when it is (or when nothing differs), 1 when a field outside the ignored ones moved, 2 on bad input.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from parity_both.receipt import VOLATILE_KEYS, content_hash, load_receipt

# what `upgraded_from_version` and friends say about loading, not about the run
_LOAD_MARKERS = ("upgraded_from_version", "_path")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted path: leaf value}; list elements get `[i]`, empty containers are leaves."""
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list) and obj:
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def pattern(path: str) -> str:
    """A flattened path with its list indices erased: `quantized.rows[3].kl` -> `quantized.rows[].kl`."""
    return re.sub(r"\[\d+\]", "[]", path)


def _covered(path: str, ignore: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + ".") or path.startswith(p + "[") for p in ignore)


def field_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, str]:
    """{path: "added" | "removed" | "changed"} for every leaf that differs (volatile keys excluded)."""
    skip = (*VOLATILE_KEYS, *_LOAD_MARKERS)
    a = {k: v for k, v in flatten(old).items() if not _covered(k, skip)}
    b = {k: v for k, v in flatten(new).items() if not _covered(k, skip)}
    out = {}
    for k in sorted(set(a) | set(b)):
        if k not in b:
            out[k] = "removed"
        elif k not in a:
            out[k] = "added"
        elif a[k] != b[k]:
            out[k] = "changed"
    return out


def drop(obj: Any, ignore: Iterable[str], prefix: str = "") -> Any:
    """A copy of `obj` without the fields under the `ignore` prefixes (list elements keep their places)."""
    ignore = tuple(ignore)
    if isinstance(obj, Mapping):
        return {
            k: drop(v, ignore, f"{prefix}.{k}" if prefix else str(k))
            for k, v in obj.items()
            if not _covered(f"{prefix}.{k}" if prefix else str(k), ignore)
        }
    if isinstance(obj, list):
        return [drop(v, ignore, f"{prefix}[{i}]") for i, v in enumerate(obj)]
    return obj


def receipts_under(root: Path) -> dict[str, Path]:
    """Receipts of a results folder keyed by their path under it (a file is its own key)."""
    if root.is_file():
        return {root.name: root}
    return {str(p.relative_to(root)): p for p in sorted(root.glob("**/receipts/*/*.json"))}


def compare_runs(old_root: Path, new_root: Path, ignore: Iterable[str] = ()) -> dict[str, Any]:
    """Pairs, per-field change counts and (apart from `ignore`) content-hash identity."""
    ignore = tuple(ignore)
    old, new = receipts_under(old_root), receipts_under(new_root)
    if old_root.is_file() and new_root.is_file():
        old, new = {"receipt": old_root}, {"receipt": new_root}
    fields: Counter[tuple[str, str]] = Counter()
    same = []
    for key in sorted(set(old) & set(new)):
        a, b = load_receipt(old[key]), load_receipt(new[key])
        for path, kind in field_changes(a, b).items():
            fields[(pattern(path), kind)] += 1
        strip = (*ignore, *_LOAD_MARKERS)
        same.append(content_hash(drop(a, strip)) == content_hash(drop(b, strip)))
    return {
        "pairs": len(same),
        "identical_apart_from_ignored": sum(same),
        "only_old": sorted(set(old) - set(new)),
        "only_new": sorted(set(new) - set(old)),
        "fields": [
            {"field": f, "change": k, "receipts": n, "ignored": _covered(f.replace("[]", "[0]"), ignore)}
            for (f, k), n in sorted(fields.items())
        ],
    }


def render(result: Mapping[str, Any], ignore: Iterable[str]) -> str:
    """One line per moved field outside `ignore`; the ignored ones counted per prefix."""
    ignore = list(ignore)
    lines = [
        f"{result['pairs']} receipt pairs; only in OLD: {len(result['only_old'])}, "
        f"only in NEW: {len(result['only_new'])}"
    ]
    per_prefix: Counter[str] = Counter()
    for row in result["fields"]:
        if row["ignored"]:
            per_prefix[next(p for p in ignore if _covered(row["field"].replace("[]", "[0]"), (p,)))] += 1
        else:
            lines.append(f"  {row['receipts']:5d}  {row['change']:8s} {row['field']}")
    for prefix in ignore:
        lines.append(f"  ignored  {prefix}: {per_prefix[prefix]} field(s) moved")
    scope = f"apart from the {len(ignore)} ignored field(s)" if ignore else "with nothing ignored"
    lines.append(f"content hash identical {scope}: {result['identical_apart_from_ignored']}/{result['pairs']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="parity-both diff", description="which receipt fields moved between two runs")
    p.add_argument("old", type=Path, help="results folder (or receipt file) of the earlier run")
    p.add_argument("new", type=Path, help="results folder (or receipt file) of the later run")
    p.add_argument("--ignore", action="append", default=[], metavar="PATH", help="dotted field prefix to leave out")
    args = p.parse_args(argv)
    for root in (args.old, args.new):
        if not root.exists():
            print(
                f"parity-both diff: {root} does not exist: give two results folders or receipt files", file=sys.stderr
            )
            return 2
    try:
        result = compare_runs(args.old, args.new, args.ignore)
    except (OSError, ValueError) as e:
        print(f"parity-both diff: {e}", file=sys.stderr)
        return 2
    if not result["pairs"]:
        print(f"parity-both diff: no receipts in common under {args.old} and {args.new}", file=sys.stderr)
        return 2
    sys.stdout.write(render(result, args.ignore))
    return 0 if result["identical_apart_from_ignored"] == result["pairs"] else 1
