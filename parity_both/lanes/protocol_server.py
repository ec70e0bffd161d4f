"""The program side of the lane protocol (docs/lane-protocol.md) for engines written in Python.

``serve(engine, argv)`` parses one request, calls the engine, writes the bulk output files and prints
the one JSON status line; every failure becomes ``{"ok": false, "exit_code", "stage", "error"}`` and
the matching exit code. An engine implements ``ProgramEngine``; the reference engine
(lanes/reference_engine.py) and the llama-cpp-python engine (lanes/llama_engine.py) are two.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

PROTOCOL_VERSION = 1
EXIT_OK, EXIT_USAGE, EXIT_BAD_INPUT, EXIT_ENGINE, EXIT_INTERNAL = 0, 1, 2, 3, 4
COMMANDS = ("info", "vocab", "tokenize", "eval")
# the options a request may carry; a program ignores any other --key value (forward compatibility)
REQUIRED = {"vocab": ("model", "out"), "tokenize": ("model", "text-file"), "eval": ("model", "ids-file", "out")}


class ProtocolError(Exception):
    def __init__(self, code: int, stage: str, message: str) -> None:
        super().__init__(message)
        self.code, self.stage = code, stage


class VocabRow(NamedTuple):
    id: int
    attr: int  # llama.cpp's llama_token_attr bits (tokenize/attrs.py)
    kind: str  # one of lanes.base TOKEN_KINDS
    text: bytes  # the token as stored in the vocabulary
    piece: bytes  # what it renders as (token_to_piece, special=True)


class EvalSettings(NamedTuple):
    threads: int
    n_ctx: int
    n_batch: int
    n_ubatch: int
    type_k: str
    type_v: str


class ProgramEngine(Protocol):
    def info(self) -> dict[str, Any]: ...
    def vocab(self, model: str) -> tuple[list[VocabRow], dict[str, Any]]: ...
    def tokenize(self, model: str, text: str, add_special: bool, parse_special: bool) -> list[int]: ...
    def n_vocab(self, model: str) -> int: ...
    def eval(self, model: str, ids: list[int], settings: EvalSettings) -> tuple[np.ndarray, dict[str, Any]]: ...


def parse_args(argv: Sequence[str]) -> tuple[str, dict[str, str]]:
    if not argv:
        raise ProtocolError(EXIT_USAGE, "args", "usage: PROGRAM info|vocab|tokenize|eval [--opt value ...]")
    command, opts, i = argv[0], {}, 1
    while i < len(argv):
        key = argv[i]
        if key == "--verbose":
            opts["verbose"] = "1"
            i += 1
            continue
        if not key.startswith("--") or i + 1 >= len(argv):
            raise ProtocolError(EXIT_USAGE, "args", f"bad argument: {key}")
        opts[key[2:]] = argv[i + 1]
        i += 2
    if command not in COMMANDS:
        raise ProtocolError(EXIT_USAGE, "args", f"unknown command {command!r} ({', '.join(COMMANDS)})")
    missing = [k for k in REQUIRED.get(command, ()) if k not in opts]
    if missing:
        raise ProtocolError(EXIT_USAGE, "args", " and ".join(f"--{k}" for k in missing) + " required")
    return command, opts


def int_opt(opts: dict[str, str], key: str, default: int) -> int:
    try:
        return int(opts.get(key, default))
    except ValueError as e:
        raise ProtocolError(EXIT_USAGE, "args", f"option --{key} needs an integer") from e


def flag_opt(opts: dict[str, str], key: str) -> bool:
    return int_opt(opts, key, 0) != 0


def read_input(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ProtocolError(EXIT_BAD_INPUT, "args", f"cannot read {path}: {e.strerror or e}") from e


def write_output(path: str, data: bytes) -> None:
    try:
        Path(path).write_bytes(data)
    except OSError as e:
        raise ProtocolError(EXIT_INTERNAL, "io", f"cannot write {path}: {e.strerror or e}") from e


def check_model(path: str) -> None:
    if not Path(path).is_file():
        raise ProtocolError(EXIT_BAD_INPUT, "load_model", f"cannot load model {path}")


def do_vocab(engine: ProgramEngine, opts: dict[str, str], status: dict[str, Any]) -> None:
    rows, meta = engine.vocab(opts["model"])
    lines = [f"{r.id}\t{r.attr}\t{r.kind}\t{r.text.hex()}\t{r.piece.hex()}\n" for r in rows]
    write_output(opts["out"], "".join(lines).encode())
    status.update(
        n_vocab=len(rows),
        bos_id=meta.get("bos_id", -1),
        eos_id=meta.get("eos_id", -1),
        add_bos=bool(meta.get("add_bos")),
        add_eos=bool(meta.get("add_eos")),
        vocab_path=opts["out"],
    )


def do_tokenize(engine: ProgramEngine, opts: dict[str, str], status: dict[str, Any]) -> None:
    raw = read_input(opts["text-file"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(EXIT_BAD_INPUT, "args", f"text file is not UTF-8 ({e})") from e
    add_special, parse_special = flag_opt(opts, "add-special"), flag_opt(opts, "parse-special")
    ids = engine.tokenize(opts["model"], text, add_special, parse_special)
    status.update(add_special=add_special, parse_special=parse_special, n_bytes=len(raw), ids=[int(i) for i in ids])


def do_eval(engine: ProgramEngine, opts: dict[str, str], status: dict[str, Any]) -> None:
    raw = read_input(opts["ids-file"])
    if not raw or len(raw) % 4:
        raise ProtocolError(EXIT_BAD_INPUT, "args", "ids file must hold >= 1 little-endian int32")
    ids = [int(i) for i in np.frombuffer(raw, dtype="<i4")]
    n_ctx = int_opt(opts, "n-ctx", max(512, len(ids)))
    n_batch = int_opt(opts, "n-batch", n_ctx)
    s = EvalSettings(
        int_opt(opts, "threads", 2),
        n_ctx,
        n_batch,
        int_opt(opts, "n-ubatch", n_batch),
        opts.get("type-k", "f32"),
        opts.get("type-v", "f32"),
    )
    if min(s.n_ctx, s.n_batch, s.n_ubatch) < len(ids):
        raise ProtocolError(EXIT_BAD_INPUT, "args", "n_ctx, n_batch and n_ubatch must all be >= the number of tokens")
    nv = engine.n_vocab(opts["model"])
    bad = next((t for t in ids if t < 0 or t >= nv), None)
    if bad is not None:
        raise ProtocolError(EXIT_BAD_INPUT, "args", f"token id {bad} outside the vocabulary")
    logits, used = engine.eval(opts["model"], ids, s)
    write_output(opts["out"], np.ascontiguousarray(logits, dtype="<f4").tobytes())
    status.update(n_tokens=len(ids), n_vocab=nv, logits_path=opts["out"], dtype="float32", settings=used)


HANDLERS: dict[str, Callable[[ProgramEngine, dict[str, str], dict[str, Any]], None]] = {
    "vocab": do_vocab,
    "tokenize": do_tokenize,
    "eval": do_eval,
}


def serve(make_engine: Callable[[], ProgramEngine], argv: Sequence[str] | None = None) -> int:
    """Answer one request; returns the exit code (the caller passes it to sys.exit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    status: dict[str, Any] = {"command": argv[0] if argv else ""}
    try:
        command, opts = parse_args(argv)
        engine = make_engine()
        if command == "info":
            status.update(engine.info())
            status["protocol"] = PROTOCOL_VERSION
        else:
            check_model(opts["model"])
            HANDLERS[command](engine, opts, status)
        status.update(ok=True, exit_code=EXIT_OK)
        code = EXIT_OK
    except ProtocolError as e:
        status.update(ok=False, exit_code=e.code, stage=e.stage, error=str(e))
        code = e.code
    except MemoryError:
        status.update(ok=False, exit_code=EXIT_INTERNAL, stage="internal", error="out of memory")
        code = EXIT_INTERNAL
    except Exception as e:  # noqa: BLE001 - any other failure is the program's internal failure (exit 4)
        traceback.print_exc(file=sys.stderr)
        status.update(ok=False, exit_code=EXIT_INTERNAL, stage="internal", error=f"{type(e).__name__}: {e}")
        code = EXIT_INTERNAL
    sys.stdout.write(json.dumps(status, sort_keys=True) + "\n")
    sys.stdout.flush()
    return code
