"""`kind: command` lanes (issue 15): any program speaking the lane protocol (docs/lane-protocol.md) is a
lane. Its spec takes argv lists only; its probe stamps the program's SHA-256 and `info`; `build:` steps
run when the program is missing; in the workflow it runs beside llama and llama-2024, and a rebuilt
program reruns exactly its lane. The NumPy reference wrapped as a program shows NMSE 0 against itself."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from parity_both.provision.failures import EXIT_SOURCE, BackendFailure
from parity_both.provision.probes import command_probe, stable_probe, stamp_can_capture, stamp_text
from parity_both.provision.provision import ensure_backend
from parity_both.provision.specs import spec_from_config

from conftest import jobs_run, snakemake, write_config

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "tools" / "lane_programs" / "toy_engine.py"


def wrapper(path: Path, *target: str) -> Path:
    """An executable program that runs `target` (a prebuilt engine, as far as parity-both can tell)."""
    path.write_text("#!/bin/sh\nexec " + " ".join(target) + ' "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_command_must_be_an_argv_not_a_shell_string():
    with pytest.raises(BackendFailure) as err:
        spec_from_config("mine", {"kind": "command", "command": "/opt/engine --flag"})
    assert err.value.code == EXIT_SOURCE and "never a shell string" in err.value.message
    with pytest.raises(BackendFailure) as err:
        spec_from_config("mine", {"kind": "command", "command": ["/opt/engine"], "build": ["make"]})
    assert err.value.code == EXIT_SOURCE and "build step" in err.value.message


def test_probe_stamps_the_program_hash_and_info(tmp_path):
    prog = wrapper(tmp_path / "engine", sys.executable, str(TOY))
    spec = spec_from_config("mine", {"kind": "command", "command": [str(prog)]})
    probe = command_probe(spec)
    assert probe["present"] is True, probe
    assert probe["binary"] == str(prog.resolve()) and probe["binary_sha256"] == sha256(prog)
    assert probe["info"]["protocol"] == 1 and probe["info"]["engine"] == "toy engine (defect none)"
    before = stable_probe({**probe, "kind": "command"})
    prog.write_text(prog.read_text() + "# rebuilt\n")  # a rebuild: new bytes, same behaviour
    after = stable_probe({**command_probe(spec), "kind": "command"})
    assert after["binary_sha256"] == sha256(prog) != before["binary_sha256"]
    os.utime(prog, (1, 1))  # a touch alone is no new engine: same stamp
    assert stamp_text({**command_probe(spec), "kind": "command"}) == stamp_text({**after, "present": True})


def test_build_steps_run_when_the_program_is_missing(tmp_path):
    src = wrapper(tmp_path / "engine.in", sys.executable, str(TOY))
    dst = tmp_path / "bin" / "engine"
    spec = spec_from_config(
        "mine",
        {
            "kind": "command",
            "command": [str(dst)],
            "build": [["mkdir", "-p", str(dst.parent)], ["cp", str(src), str(dst)], ["chmod", "+x", str(dst)]],
        },
    )
    assert command_probe(spec)["present"] is False
    done = ensure_backend(spec, tmp_path / "cache", tmp_path / "build.log", "auto")
    assert done.repaired and dst.is_file()
    ident = done.identity
    assert ident["kind"] == "command" and ident["command"] == [str(dst)] and ident["binary_sha256"] == sha256(dst)
    assert ident["info"]["protocol"] == 1 and "$ cp" in (tmp_path / "build.log").read_text()

    broken = spec_from_config("bad", {"kind": "command", "command": [str(tmp_path / "nope")], "build": [["false"]]})
    with pytest.raises(BackendFailure) as err:
        ensure_backend(broken, tmp_path / "cache", tmp_path / "bad.log", "auto")
    assert err.value.code == 5 and "build step ['false'] failed" in err.value.message


def test_command_lane_reads_the_protocol_and_maps_exit_codes(tmp_path, smol_path):
    from parity_both.lanes.command import CommandLane, CommandRunError
    from parity_both.pipeline import InputError

    lane = CommandLane([sys.executable, str(TOY)], smol_path, n_ctx=16)
    try:
        vocab = lane.vocab()
        assert len(vocab.tokens) == 49152 and vocab.bos_id == 1 and vocab.tokens[1][2] == "control"
        ids = lane.tokenize("Hello world", parse_special=False)
        logits = lane.eval_logits([1, *ids])
        assert logits.shape == (len(ids) + 1, 49152) and logits.dtype.name == "float32"
        assert lane.settings()["type_k"] == "f32" and lane.identity()["kind"] == "command"
        with pytest.raises(InputError, match="outside the vocabulary"):
            lane.eval_logits([1, 49152])
    finally:
        lane.close()
    broken = CommandLane([sys.executable, str(TOY), "--defect", "exit"], smol_path)
    try:
        with pytest.raises(CommandRunError, match="exit status 3"):
            broken.eval_logits([1, 49152])
    finally:
        broken.close()


def test_only_a_command_lane_without_the_capture_extension_skips_the_kernel_check(tmp_path):
    def stamp(expected: dict) -> Path:
        p = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
        p.write_text(json.dumps({"expected": expected, "present": True}))
        return p

    assert stamp_can_capture(stamp({"kind": "harness"})) and stamp_can_capture(stamp({"kind": "python"}))
    assert not stamp_can_capture(stamp({"kind": "command", "info": {"protocol": 1, "capabilities": []}}))
    assert stamp_can_capture(stamp({"kind": "command", "info": {"protocol": 1, "capabilities": ["capture"]}}))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The llama-2024 build of $PARITY_BOTH_TEST_CACHE (copied), else one built here."""
    dst = tmp_path_factory.mktemp("cache") / "parity-both"
    src = os.environ.get("PARITY_BOTH_TEST_CACHE")
    if src and Path(src, "builds").is_dir():
        for sub in ("builds", "sources"):
            for entry in Path(src, sub).glob("*") if Path(src, sub).is_dir() else []:
                if entry.name.startswith(("llama-2024-", "sdist-llama-cpp-python-0.3.1")):
                    shutil.copytree(entry, dst / sub / entry.name, symlinks=True)
    dst.mkdir(parents=True, exist_ok=True)
    return dst


@pytest.mark.slow
def test_command_lane_beside_llama_and_llama_2024_and_reruns_alone(cache, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    prog = wrapper(tmp_path / "ref-engine", sys.executable, "-m", "parity_both.lanes.reference_engine")
    # max_tokens 0: the reference evaluates the prompt in one batch, as the lane does, so NMSE is exactly 0
    write_config(
        work,
        {
            "models": {"smol": {"gguf": "embedded", "twin": "off"}},
            "max_tokens": 0,
            "kernels": False,
            "prompts": {"capital": {"text": "What is the capital of France?", "template": "raw"}},
            "lanes": ["llama-2024", "llama", "ref"],
            "backends": {"ref": {"kind": "command", "command": [str(prog)]}},
        },
    )
    env = {"PARITY_BOTH_CACHE": str(cache), "PARITY_BOTH_REPAIR": "auto"}
    snakemake(work, "--cores", "2", env=env)
    s = json.loads((work / "results/summary.json").read_text())
    assert s["overall"]["exit_code"] == 0 and set(s["lanes"]) == {"llama", "llama-2024", "ref"}, s
    r = json.loads((work / "results/smol/receipts/ref/capital.json").read_text())
    ident = r["backend_identity"]
    assert ident["kind"] == "command" and ident["command"] == [str(prog)] and ident["binary_sha256"] == sha256(prog)
    assert ident["info"]["protocol"] == 1 and ident["runtime"]["info"]["engine"].startswith("parity-both numpy")
    rows = r["quantized"]["rows"]
    assert rows and all(row["nmse"] == 0.0 for row in rows), [row["nmse"] for row in rows]

    prog.write_text(prog.read_text() + "# rebuilt\n")  # a rebuilt engine: only its lane reruns
    proc = snakemake(work, "--cores", "2", env=env)
    ran, out = jobs_run(proc), proc.stdout + proc.stderr
    assert ran.count("backend") == 1 and "lane=ref" in out, ran
    assert "lane=llama-2024" not in out and "lane=llama," not in out and "lane=llama\n" not in out
    assert {"lane_eval", "lane_vocab", "receipt"} <= set(ran)
    assert not {"reference", "model_facts", "tokenizer_authority"} & set(ran), ran

    os.utime(prog)  # touched, same bytes: nothing to do
    proc = snakemake(work, "--cores", "2", env=env)
    assert jobs_run(proc) == [], jobs_run(proc)
