"""The malformed-input corpus: every case through `parity-both` (and plain Snakemake for the GGUF cases).

Each row: the case, how to build it (from the tiny generated fixture plus byte edits), the documented
exit code, and a fragment of the one clear line. Each run: that exit code, one JSON document on stdout
(--format json) whose `error` names the input, no traceback on stderr, no partial file under results/.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from parity_both.gguf.lowlevel import iter_keys, iter_tensor_infos, read_header, skip_value

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "parity_both.cli"]
RAW = ("--lanes", "llama", "--max-tokens", "1", "--prompt-template", "raw", "--format", "json")


@dataclass(frozen=True)
class Layout:
    """Where each section of the tiny fixture starts (byte offsets)."""

    data: bytes
    kv_start: int
    table_start: int
    data_start: int
    tensors: list[tuple[str, int, int]]  # (name, position of its info record, relative offset)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Layout]:
    from parity_both.fixtures import write_fixture

    path = tmp_path_factory.mktemp("corpus") / "tiny.gguf"
    write_fixture(path, arch="llama", weight_type="F32", size="tiny")
    with open(path, "rb") as fh:
        _, n_tensors, n_kv = read_header(fh, path)
        kv_start = fh.tell()
        for _key, vtype in iter_keys(fh, n_kv):
            skip_value(fh, vtype)
        table_start = fh.tell()
        infos, positions = [], []
        for _ in range(n_tensors):
            positions.append(fh.tell())
            infos.extend(iter_tensor_infos(fh, 1))
        data_start = (fh.tell() + 31) // 32 * 32
    tensors = [(name, pos, off) for (name, _shape, _t, off), pos in zip(infos, positions, strict=True)]
    return path, Layout(path.read_bytes(), kv_start, table_start, data_start, tensors)


def info_pos(lay: Layout, name: str) -> tuple[int, int]:
    """(position of the tensor's n_dims field, its n_dims) in the tensor table."""
    pos = next(p for n, p, _ in lay.tensors if n == name)
    dims_at = pos + 8 + len(name.encode())
    return dims_at, struct.unpack_from("<I", lay.data, dims_at)[0]


def patch(lay: Layout, at: int, fmt: str, value: object) -> bytes:
    b = bytearray(lay.data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def type_and_offset_at(lay: Layout, name: str) -> int:
    dims_at, n_dims = info_pos(lay, name)
    return dims_at + 4 + 8 * n_dims


def fill_tensor(lay: Layout, name: str, value: float) -> bytes:
    _, _, off = next(t for t in lay.tensors if t[0] == name)
    b = bytearray(lay.data)
    start = lay.data_start + off
    b[start : start + 256] = struct.pack("<64f", *([value] * 64))
    return bytes(b)


GGUF_EDITS: dict[str, Callable[[Layout], bytes]] = {
    "empty_file": lambda lay: b"",
    "trunc_header": lambda lay: lay.data[:14],
    "trunc_kv": lambda lay: lay.data[: lay.kv_start + (lay.table_start - lay.kv_start) // 2],
    "trunc_table": lambda lay: lay.data[: lay.table_start + 40],
    "trunc_data": lambda lay: lay.data[: len(lay.data) - 1000],
    "bad_magic": lambda lay: b"GGML" + lay.data[4:],
    "bad_version": lambda lay: patch(lay, 4, "<I", 99),
    "tensor_count_overflow": lambda lay: patch(lay, 8, "<Q", 2**63),
    "kv_count_overflow": lambda lay: patch(lay, 16, "<Q", 2**64 - 1),
    "string_length_lie": lambda lay: patch(lay, lay.kv_start, "<Q", 2**60),
    "too_many_dims": lambda lay: patch(lay, info_pos(lay, "blk.0.attn_q.weight")[0], "<I", 9),
    "shape_overflow": lambda lay: patch(lay, info_pos(lay, "blk.0.attn_q.weight")[0] + 4, "<Q", 2**62),
    "offset_outside_file": lambda lay: patch(lay, type_and_offset_at(lay, "blk.0.attn_q.weight") + 4, "<Q", 2**40),
    "offset_misaligned": lambda lay: patch(
        lay, type_and_offset_at(lay, "blk.0.attn_q.weight") + 4, "<Q", lay.tensors[2][2] + 4
    ),
    "tensors_overlap": lambda lay: patch(lay, type_and_offset_at(lay, "blk.0.attn_q.weight") + 4, "<Q", 0),
    "unknown_type_id": lambda lay: patch(lay, type_and_offset_at(lay, "blk.0.attn_q.weight"), "<I", 200),
}


@dataclass(frozen=True)
class Case:
    name: str
    code: int
    fragment: str
    make: Callable[[Path, Path, Layout], list[str]]  # (tmp dir, tiny fixture, layout) -> CLI args
    snakemake: bool = False  # also through plain `snakemake results/summary.json`
    slow: bool = False
    receipts: bool = False  # the run completes and its receipts state the problem (no `error` object)


def gguf_case(name: str, fragment: str) -> Case:
    def make(tmp: Path, _tiny: Path, lay: Layout) -> list[str]:
        bad = tmp / f"{name}.gguf"
        bad.write_bytes(GGUF_EDITS[name](lay))
        return ["--model-gguf", str(bad)]

    return Case(name, 2, fragment, make, snakemake=True)


def with_model(*extra: str) -> Callable[[Path, Path, Layout], list[str]]:
    return lambda tmp, tiny, lay: ["--model-gguf", str(tiny), *extra]


def file_arg(flag: str, name: str, content: bytes | str) -> Callable[[Path, Path, Layout], list[str]]:
    def make(tmp: Path, tiny: Path, lay: Layout) -> list[str]:
        p = tmp / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["--model-gguf", str(tiny), flag, str(p)]

    return make


def config_case(name: str, cfg: object, fragment: str) -> Case:
    return Case(name, 2, fragment, file_arg("--config", f"{name}.yaml", yaml.safe_dump(cfg)))


def tokenizer_edit(name: str, edit: Callable[[dict], dict], fragment: str, code: int = 2) -> Case:
    def make(tmp: Path, tiny: Path, lay: Layout) -> list[str]:
        from parity_both.tokenize.authority import build_authority

        base = tmp / "base_tokenizer.json"
        build_authority(str(tiny), "gguf_embedded", None, str(base))
        p = tmp / f"{name}.json"
        p.write_text(json.dumps(edit(json.loads(base.read_text()))))
        return ["--model-gguf", str(tiny), "--tokenizer", str(p)]

    return Case(name, code, fragment, make, slow=True, receipts=True)


def drop_specials(tok: dict) -> dict:
    tok["added_tokens"] = []
    return tok


def other_model(tok: dict) -> dict:  # another model's vocabulary: ids shifted
    tok["model"]["vocab"] = {k: (v + 7) % len(tok["model"]["vocab"]) for k, v in tok["model"]["vocab"].items()}
    return tok


def unwritable_parent(tmp: Path, tiny: Path, lay: Layout) -> list[str]:
    (tmp / "a_file").write_text("x")
    return ["--model-gguf", str(tiny), "--out-dir", str(tmp / "a_file" / "out")]


CASES = [
    gguf_case("empty_file", "not a GGUF file"),
    gguf_case("trunc_header", "truncated GGUF"),
    gguf_case("trunc_kv", "truncated GGUF"),
    gguf_case("trunc_table", "truncated GGUF"),
    gguf_case("trunc_data", "truncated GGUF"),
    gguf_case("bad_magic", "not a GGUF file"),
    gguf_case("bad_version", "version 99"),
    gguf_case("tensor_count_overflow", "corrupt GGUF header"),
    gguf_case("kv_count_overflow", "corrupt GGUF header"),
    gguf_case("string_length_lie", "implausible"),
    gguf_case("too_many_dims", "dims"),
    gguf_case("shape_overflow", "impossible shape"),
    gguf_case("offset_outside_file", "truncated GGUF"),
    gguf_case("offset_misaligned", "not 32-aligned"),
    gguf_case("tensors_overlap", "overlap"),
    gguf_case("unknown_type_id", "type id 200"),
    Case("missing_gguf", 2, "no such file", lambda tmp, tiny, lay: ["--model-gguf", str(tmp / "none.gguf")]),
    Case("gguf_is_a_directory", 2, "no such file", lambda tmp, tiny, lay: ["--model-gguf", str(tmp)]),
    Case(
        "nan_weights",
        2,
        "not finite",
        lambda tmp, tiny, lay: [
            "--model-gguf",
            write(tmp / "nan.gguf", fill_tensor(lay, "blk.0.attn_q.weight", math.nan)),
        ],
        slow=True,
    ),
    Case(
        "inf_weights",
        2,
        "not finite",
        lambda tmp, tiny, lay: [
            "--model-gguf",
            write(tmp / "inf.gguf", fill_tensor(lay, "blk.1.ffn_up.weight", math.inf)),
        ],
        slow=True,
    ),
    Case("tokenizer_invalid_json", 2, "not a JSON tokenizer", file_arg("--tokenizer", "t.json", "{nope")),
    Case("tokenizer_non_utf8", 2, "not a JSON tokenizer", file_arg("--tokenizer", "t.json", b'{"a": "\xff\xfe"}')),
    Case("tokenizer_not_an_object", 2, "not a JSON tokenizer", file_arg("--tokenizer", "t.json", "[1, 2]")),
    Case("tokenizer_missing", 2, "no such file", lambda tmp, tiny, lay: ["--tokenizer", str(tmp / "none.json")]),
    tokenizer_edit("tokenizer_other_model", other_model, "token ids differ"),
    tokenizer_edit("tokenizer_missing_specials", drop_specials, "vocabulary differs"),
    config_case("config_unknown_key", {"no_such_key": 1}, "no_such_key"),
    config_case("config_wrong_type", {"threads": "two"}, "threads"),
    config_case("config_out_of_range", {"threads": 0}, "threads"),
    config_case("config_bad_enum", {"reference": {"mode": "bogus"}}, "bogus"),
    config_case("config_wrong_list_type", {"gates": "true"}, "gates"),
    config_case("config_bad_threshold", {"thresholds": {"exact": {"cos_tol": "high"}}}, "cos_tol"),
    config_case("config_bad_boolean", {"diagnose": "maybe"}, "diagnose"),
    config_case("config_not_mapping", [1, 2], "must be a YAML mapping"),
    Case("config_not_yaml", 2, "not valid YAML", file_arg("--config", "c.yaml", "a: [")),
    Case("config_missing", 2, "no such file", lambda tmp, tiny, lay: ["--config", str(tmp / "none.yaml")]),
    Case("prompt_empty", 2, "--prompt is empty", with_model("--prompt", "")),
    Case("prompt_whitespace_only", 2, "--prompt is empty", with_model("--prompt", "   ")),
    Case("prompt_non_utf8", 2, "not valid UTF-8", with_model("--prompt", os.fsdecode(b"caf\xe9"))),
    Case(
        "prompt_longer_than_context", 2, "context length 256", with_model("--prompt", "hello world " * 300), slow=True
    ),
    Case("unwritable_out_dir", 2, "--out-dir", unwritable_parent),
    Case("negative_max_tokens", 2, "invalid arguments", with_model("--max-tokens", "-1")),
]


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def partial_files(results: Path) -> list[str]:
    """Files a failed job left behind: temporaries, and outputs Snakemake marked incomplete."""
    bad = [str(p) for p in results.rglob("*") if p.name.endswith((".tmp", ".tmp.npz")) or ".tmp" in p.name]
    meta = results.parent / ".snakemake" / "incomplete"
    if meta.is_dir():
        bad += [str(p) for p in meta.iterdir()]
    return bad


def check_outcome(p: subprocess.CompletedProcess, case: Case, out: Path) -> None:
    assert p.returncode == case.code, f"{case.name}: {p.returncode}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    doc = json.loads(p.stdout)  # one JSON document, naming the error
    assert doc["overall"]["exit_code"] == case.code
    head = [ln for ln in p.stderr.splitlines() if ln.startswith("parity-both:")]
    assert len(head) == 1 and case.fragment in head[0], p.stderr[-3000:]
    if case.receipts:  # completed: the receipt states it, and only this run's receipt is there
        assert "error" not in doc and doc["overall"]["receipts"] == 1
        assert not partial_files(out / "results")
        return
    assert case.fragment in doc["error"]["message"], doc["error"]
    assert doc["error"]["fix"]
    if out.is_dir():
        assert not partial_files(out / "results"), partial_files(out / "results")
        assert not list(out.glob("receipt_*.json"))


def marks(case: Case) -> list:
    return [pytest.mark.slow] if case.slow else []


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=marks(c)) for c in CASES])
def test_malformed_input(case: Case, tiny, tmp_path):
    tiny_path, lay = tiny
    args = case.make(tmp_path, tiny_path, lay)
    out = tmp_path / "ci"
    if "--out-dir" not in args:
        args += ["--out-dir", str(out)]
    p = subprocess.run([*CLI, *RAW, *args], capture_output=True, text=True, timeout=600)
    check_outcome(p, case, out)


GGUF_CASES = [c for c in CASES if c.snakemake]
SNAKEMAKE_DEFAULT = {"trunc_kv", "bad_magic", "tensors_overlap", "unknown_type_id", "offset_outside_file"}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name, marks=[] if c.name in SNAKEMAKE_DEFAULT else [pytest.mark.slow]) for c in GGUF_CASES],
)
def test_malformed_gguf_through_plain_snakemake(case: Case, tiny, tmp_path):
    """Plain snakemake (its own exit convention: 1) names the file and the problem, without a traceback,
    and writes nothing under results/."""
    tiny_path, lay = tiny
    gguf = case.make(tmp_path, tiny_path, lay)[1]
    work = tmp_path / "wf"
    work.mkdir()
    cfg = {
        "standalone": True,
        "lanes": ["llama"],
        "max_tokens": 1,
        "out_dir": "results",
        "models": {"m": {"gguf": gguf}},
        "prompts": {"p": {"text": "hi", "template": "raw"}},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work)]
    cmd += ["--configfile", str(work / "config.yaml"), "--cores", "1", "results/summary.json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    text = p.stdout + p.stderr
    assert p.returncode == 1, text[-3000:]
    assert case.fragment in text and Path(gguf).name in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    results = work / "results"
    assert not results.exists() or not [q for q in results.rglob("*") if q.is_file() and "logs" not in q.parts]
