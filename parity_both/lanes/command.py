"""Any program that speaks the lane protocol (docs/lane-protocol.md) as a lane: ``kind: command``.

The C++ harness is one such program; ``CommandLane`` reuses ``HarnessLane``'s protocol client (vocab
TSV, int32 ids, float32 logits, exit-code mapping) and only changes how a request is started (the
configured argv before the subcommand), what the lane says about itself (command, binary SHA-256,
the program's ``info``) and the optional capture extension (only when ``info`` advertises it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from parity_both.lanes.harness import EXIT_BAD_INPUT, HarnessLane
from parity_both.provision.harness import HarnessRunError, run_program

PROTOCOL_VERSION = 1
STATUS_SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "lane-status.schema.json"


class CaptureUnsupported(RuntimeError):
    """The program does not advertise the capture extension (``"capabilities": ["capture"]`` in info)."""


@cache
def _validator() -> Any:
    import jsonschema

    schema = json.loads(STATUS_SCHEMA.read_text())
    return jsonschema.Draft202012Validator(schema)


def status_errors(status: Mapping[str, Any]) -> list[str]:
    """Why a status line does not conform to schemas/lane-status.schema.json (empty: it conforms)."""
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(line)'}: {e.message}"
        for e in sorted(_validator().iter_errors(dict(status)), key=str)
    ]


def resolve_program(path: str) -> Path | None:
    """A command's program as a file: a path (relative to the current directory) or a name on PATH."""
    if "/" not in path:
        found = shutil.which(path)
        return Path(found).resolve() if found else None
    p = Path(path).expanduser().resolve()
    return p if p.is_file() else None


class CommandRunError(HarnessRunError):
    """A lane program failed a request (exit 1, 3, 4, killed, or no status line)."""


class CommandLane(HarnessLane):
    """LaneEngine over a protocol program: every call is one process ``[*command, SUBCOMMAND, ...]``."""

    def __init__(
        self,
        command: Sequence[str],
        model_path: Path | str,
        *,
        threads: int = 2,
        n_ctx: int | None = None,
        type_k: str = "f32",
        type_v: str = "f32",
        info: Mapping[str, Any] | None = None,
        identity_extra: Mapping[str, Any] | None = None,
        timeout: float = 600.0,
    ) -> None:
        # HarnessLane's state, without a HarnessBuild (identity and settings are overridden here)
        self.command = [str(c) for c in command]
        self.binary = Path(self.command[0])
        self.model_path = Path(model_path)
        self.threads, self.n_ctx, self.type_k, self.type_v = threads, n_ctx, type_k, type_v
        self.v_f16_fallback = True
        self.use_extra_bufts = None
        self.timeout = timeout
        self._info = dict(info) if info is not None else None
        self._identity_extra = dict(identity_extra or {})
        self._vocab = None
        self._pieces: list[str] = []
        self._last_settings: dict[str, Any] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="parity-command-")

    @classmethod
    def from_backend(
        cls,
        backend: Mapping[str, Any],
        model_path: Path | str,
        *,
        n_ctx: int | None = None,
        threads: int = 2,
        **kwargs: Any,
    ) -> CommandLane:
        """From the backend record written by parity_both.provision.provision.provision_lane."""
        ident = dict(backend.get("identity") or {})
        extra = {k: ident[k] for k in ("name", "binary", "binary_sha256") if k in ident}
        if backend.get("lane"):
            extra["lane"] = backend["lane"]
        return cls(
            ident["command"],
            model_path,
            n_ctx=n_ctx,
            threads=threads,
            info=ident.get("info"),
            identity_extra=extra,
            **kwargs,
        )

    def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = self._request(["info"])
        return dict(self._info)

    # -- LaneEngine
    def identity(self) -> dict[str, Any]:
        info = self.info()
        return {
            "engine": info.get("engine") or self._identity_extra.get("name") or self.command[0],
            "kind": "command",
            "command": list(self.command),
            "protocol": info.get("protocol"),
            "info": info,
            **self._identity_extra,
        }

    def settings(self) -> dict[str, Any]:
        if self._last_settings:
            return dict(self._last_settings)
        return {
            "threads": self.threads,
            "n_ctx": self.n_ctx,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "one_batch": True,
        }

    def vocab(self) -> Any:
        dump = super().vocab()
        dump.extra["source"] = f"lane program {self.command[0]} (vocab TSV)"
        return dump

    def _run(self, args: Sequence[str]) -> dict[str, Any]:
        return self._request([args[0], "--model", str(self.model_path), *args[1:]])

    def _request(self, args: Sequence[str]) -> dict[str, Any]:
        res = run_program([*self.command, *args], timeout=self.timeout)
        st = res.status or {}
        if res.returncode == 0 and st.get("ok") is True:
            return st
        detail = st.get("error") or res.stderr.strip()[-2000:] or f"exit status {res.returncode}"
        msg = f"lane program {self.command[0]} {args[0]} failed (exit status {res.returncode}): {detail}"
        record = {"lane_program_exit_code": res.returncode, "lane_program_stage": st.get("stage")}
        if res.returncode == EXIT_BAD_INPUT:
            from parity_both.pipeline import InputError

            err = InputError(f"{msg} (stage {st.get('stage')})")
            err.record = record  # type: ignore[attr-defined]
            raise err
        exc = CommandRunError(msg, st, res.returncode)
        exc.record = record  # type: ignore[attr-defined]
        raise exc

    def eval_capture(self, ids: list[int], out_prefix: str | Path) -> tuple[Any, dict[str, Any]]:
        """The capture extension (``eval --capture DIR``), only for a program whose info lists it."""
        if "capture" not in (self.info().get("capabilities") or []):
            raise CaptureUnsupported(
                f"lane program {self.command[0]} does not advertise the capture extension "
                "(info capabilities); set `kernels: false` and leave diagnose off for this lane"
            )
        from parity_both.lanes.capture import write_from_raw_dir

        raw_dir = Path(self._tmp.name) / "capture"
        shutil.rmtree(raw_dir, ignore_errors=True)
        raw_dir.mkdir()
        try:
            logits = self._eval(ids, raw_dir)
            index = write_from_raw_dir(raw_dir, out_prefix, engine=f"{self.identity()['engine']} (command lane)")
        finally:
            shutil.rmtree(raw_dir, ignore_errors=True)
        return logits, index

    def __enter__(self) -> CommandLane:
        return self
