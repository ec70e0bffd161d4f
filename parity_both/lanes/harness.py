"""The C++ harness as a lane: ``HarnessLane`` implements ``LaneEngine`` by running the binary built by
``parity_both.provision.harness`` in a subprocess, one request each.

The harness's exit codes (documented at the top of harness/parity_harness.cpp) map to the pipeline's:
2 (bad input: the model cannot be loaded, a token id outside the vocabulary, ...) raises the pipeline's
``InputError`` (exit 2); 1 (usage), 3 (engine failure), 4 (internal) and a killed process raise
``HarnessRunError`` (an internal failure of the lane, exit 1).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parity_both.provision.harness import HarnessBuild, HarnessRunError, run_harness

# harness/parity_harness.cpp's exit codes
EXIT_USAGE, EXIT_BAD_INPUT, EXIT_ENGINE, EXIT_INTERNAL = 1, 2, 3, 4

if TYPE_CHECKING:
    import numpy as np

    from parity_both.lanes.base import VocabDump


class HarnessLane:
    """LaneEngine over the C++ harness: every call is one harness process (the engine never shares
    a process with another engine or with Python's llama-cpp-python)."""

    def __init__(
        self,
        build: HarnessBuild | Path | str,
        model_path: Path | str,
        *,
        threads: int = 2,
        n_ctx: int | None = None,
        type_k: str = "f32",
        type_v: str = "f32",
        v_f16_fallback: bool = True,
        use_extra_bufts: bool | None = None,
        identity_extra: dict[str, Any] | None = None,
        timeout: float = 600.0,
    ) -> None:
        if isinstance(build, (str, Path)):
            build = HarnessBuild.load(Path(build))
        self.build = build
        self.binary = Path(build.harness_path)
        self.model_path = Path(model_path)
        self.threads = threads
        self.n_ctx = n_ctx
        self.type_k = type_k
        self.type_v = type_v
        self.v_f16_fallback = v_f16_fallback
        self.use_extra_bufts = use_extra_bufts  # None: the engine's default (recorded after an eval)
        self.timeout = timeout
        self._identity_extra = dict(identity_extra or {})
        self._vocab: VocabDump | None = None
        self._pieces: list[str] = []
        self._last_settings: dict[str, Any] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="parity-harness-")

    @classmethod
    def from_backend(
        cls,
        backend: Mapping[str, Any],
        model_path: Path | str,
        *,
        n_ctx: int | None = None,
        threads: int = 2,
        **kwargs: Any,
    ) -> HarnessLane:
        """From the backend record written by parity_both.provision.backends.provision_lane."""
        ident = dict(backend.get("identity") or backend)
        hpath = Path(backend.get("harness") or ident["harness_path"])
        build = HarnessBuild.load(hpath.parent.parent / "harness.json")
        extra = {
            k: ident[k]
            for k in (
                "name",
                "revision",
                "source",
                "recipe",
                "key",
                "linked_package",
                "sdist",
                "sdist_sha256",
                "git_url",
                "git_commit",
                "bitnet_lut_header",
                "libllama_sha256",
            )
            if k in ident
        }
        if backend.get("lane"):
            extra["lane"] = backend["lane"]
        return cls(build, model_path, n_ctx=n_ctx, threads=threads, identity_extra=extra, **kwargs)

    # -- LaneEngine
    def identity(self) -> dict[str, Any]:
        return {
            "engine": "bitnet.cpp" if self._identity_extra.get("recipe") == "bitnet" else "llama.cpp",
            "kind": "harness",
            "harness_path": str(self.binary),
            "harness_digest": self.build.harness_digest,
            "api_generation": self.build.api_generation,
            "api_features": self.build.api_features,
            "lib_dir": self.build.lib_dir,
            "libraries": self.build.libraries,
            "compiler": self.build.compiler,
            "engine_build": self.build.engine,
            **self._identity_extra,
        }

    def settings(self) -> dict[str, Any]:
        if self._last_settings:
            return dict(self._last_settings)
        v_note = (
            "f32 requested; October-2024 llama.h refuses it without flash attention, then f16"
            if self.build.api_generation == "2024-10" and self.type_v == "f32"
            else None
        )
        out: dict[str, Any] = {
            "threads": self.threads,
            "n_ctx": self.n_ctx,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "flash_attn": False,
            "one_batch": True,
            "use_extra_bufts": self.use_extra_bufts,
        }
        if v_note:
            out["type_v_note"] = v_note
        return out

    def _run(self, args: Sequence[str]) -> dict[str, Any]:
        try:
            return run_harness(self.binary, [args[0], "--model", str(self.model_path), *args[1:]], timeout=self.timeout)
        except HarnessRunError as exc:
            # kept in the job's failure record (jobs.run_job adds an exception's `record`)
            record = {"harness_exit_code": exc.returncode, "harness_stage": exc.status.get("stage")}
            if exc.returncode == EXIT_BAD_INPUT:
                from parity_both.pipeline import InputError

                err = InputError(f"{exc.status.get('error') or exc} (harness stage {exc.status.get('stage')})")
                err.record = record  # type: ignore[attr-defined]
                raise err from exc
            exc.record = record  # type: ignore[attr-defined]
            raise

    def vocab(self) -> VocabDump:
        from parity_both.lanes.base import VocabDump
        from parity_both.tokenize.attrs import ATTR_KIND_MASK, TOKEN_KINDS

        if self._vocab is not None:
            return self._vocab
        out = Path(self._tmp.name) / "vocab.tsv"
        st = self._run(["vocab", "--out", str(out)])
        tokens: list[tuple[int, str, str]] = []
        attrs: dict[int, int] = {}
        pieces: list[str] = []
        with open(out, "rb") as fh:
            for line in fh:
                tid_s, attr_s, kind, text_hex, piece_hex = line.rstrip(b"\n").split(b"\t")
                tid, attr = int(tid_s), int(attr_s)
                # the same decoding as the llama-cpp-python lane (invalid UTF-8 kept as surrogates)
                text = bytes.fromhex(text_hex.decode()).decode("utf-8", errors="surrogateescape")
                pieces.append(bytes.fromhex(piece_hex.decode()).decode("utf-8", errors="replace"))
                k = kind.decode()
                tokens.append((tid, text, k if k in TOKEN_KINDS else "undefined"))
                if attr & ~ATTR_KIND_MASK:
                    attrs[tid] = attr  # flag bits (normalized, lstrip, rstrip, single_word)
        self._pieces = pieces
        bos = int(st["bos_id"])
        eos = int(st["eos_id"])
        self._vocab = VocabDump(
            tokens=tokens,
            bos_id=bos if bos >= 0 else None,
            eos_id=eos if eos >= 0 else None,
            add_bos=bool(st["add_bos"]),
            add_eos=bool(st["add_eos"]),
            extra={
                "n_vocab": int(st["n_vocab"]),
                "api_generation": st.get("api_generation"),
                "attr_flags": attrs,
                "source": "harness (llama.h vocab API)",
            },
        )
        return self._vocab

    def tokenize(self, text: str, parse_special: bool) -> list[int]:
        return self.tokenize_raw(text, add_special=False, parse_special=parse_special)

    def tokenize_raw(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        path = Path(self._tmp.name) / "text.bin"
        path.write_bytes(text.encode("utf-8"))
        st = self._run(
            [
                "tokenize",
                "--text-file",
                str(path),
                "--add-special",
                str(int(add_special)),
                "--parse-special",
                str(int(parse_special)),
            ]
        )
        return [int(i) for i in st["ids"]]

    def piece(self, token_id: int) -> str:
        """llama_token_to_piece(special=True), as the llama-cpp-python lane reports it."""
        self.vocab()
        return self._pieces[token_id]

    def eval_logits(self, ids: list[int]) -> np.ndarray:
        return self._eval(ids, None)

    def eval_capture(self, ids: list[int], out_prefix: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
        """Logits as eval_logits, from the same single decode that records every graph node
        (``--capture``); writes {out_prefix}.npz + {out_prefix}.json (lanes/capture.py)."""
        from parity_both.lanes.capture import write_from_raw_dir

        raw_dir = Path(self._tmp.name) / "capture"
        shutil.rmtree(raw_dir, ignore_errors=True)
        raw_dir.mkdir()
        try:
            logits = self._eval(ids, raw_dir)
            ident = self.identity()
            engine = f"{ident['engine']} via parity_harness ({ident['api_generation']})"
            index = write_from_raw_dir(raw_dir, out_prefix, engine=engine)
        finally:
            shutil.rmtree(raw_dir, ignore_errors=True)
        return logits, index

    def _eval(self, ids: list[int], capture_dir: Path | None) -> np.ndarray:
        import numpy as np

        if not ids:
            raise ValueError("eval_logits needs at least one id")
        ids_path = Path(self._tmp.name) / "ids.i32"
        out_path = Path(self._tmp.name) / "logits.f32"
        np.asarray(ids, dtype="<i4").tofile(ids_path)
        extra = "default" if self.use_extra_bufts is None else str(int(self.use_extra_bufts))
        args = [
            "eval",
            "--ids-file",
            str(ids_path),
            "--out",
            str(out_path),
            "--threads",
            str(self.threads),
            "--type-k",
            self.type_k,
            "--type-v",
            self.type_v,
            "--v-f16-fallback",
            str(int(self.v_f16_fallback)),
            "--extra-bufts",
            extra,
        ]
        if self.n_ctx:
            n_ctx = max(self.n_ctx, len(ids))
            args += ["--n-ctx", str(n_ctx), "--n-batch", str(n_ctx), "--n-ubatch", str(n_ctx)]
        if capture_dir is not None:
            args += ["--capture", str(capture_dir)]
        st = self._run(args)
        n_tok, n_vocab = int(st["n_tokens"]), int(st["n_vocab"])
        logits = np.fromfile(out_path, dtype="<f4")
        if logits.size != n_tok * n_vocab:
            raise HarnessRunError(f"logits file has {logits.size} values, expected {n_tok}x{n_vocab}", st)
        self._last_settings = dict(st.get("settings", {}))
        out_path.unlink(missing_ok=True)
        return logits.reshape(n_tok, n_vocab).astype(np.float32, copy=False)

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> HarnessLane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
