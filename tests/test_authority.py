"""The tokenizer authority: source detection, hashes that mean something, vocabulary fingerprints.

Real components only: the embedded SmolLM2 GGUF, our rebuild of its tokenizer, llama.cpp's own view
of the vocabulary through llama-cpp-python.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from parity_both import pipeline
from parity_both.lanes.base import TokenizationContract, VocabDump, apply_contract
from parity_both.tokenize.authority import (
    AuthorityError,
    build_authority,
    compare_vocabs,
    detect_source,
    dump_ids_table,
    vocab_fingerprint,
)
from parity_both.tokenize.llama_cpp import vocab_dump_from_llama_cpp
from parity_both.tokenize.reference import ReferenceTokenizer
from parity_both.tokenize.sources import embedded_model_gguf

MODEL = embedded_model_gguf()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("auth") / "tokenizer.json"
    return build_authority(str(MODEL), "gguf_embedded", None, str(out)), out


def _external(tmp_path: Path, tok_json: dict[str, Any] | bytes, name: str = "tokenizer.json") -> dict[str, Any]:
    src = tmp_path / "src" / name
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(tok_json if isinstance(tok_json, bytes) else json.dumps(tok_json).encode())
    return build_authority(str(MODEL), "external", str(src), str(tmp_path / "eff" / "tokenizer.json"))


def test_source_detection_all_three(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    gguf = model_dir / "m.gguf"
    os.symlink(MODEL, gguf)
    assert detect_source(str(gguf), None) == ("gguf_embedded", None)
    (model_dir / "tokenizer.json").write_text("{}")
    assert detect_source(str(gguf), None) == ("auto_discovered", str(model_dir / "tokenizer.json"))
    ext = tmp_path / "elsewhere.json"
    ext.write_text("{}")
    assert detect_source(str(gguf), str(ext)) == ("external", str(ext))  # config wins over discovery
    with pytest.raises(AuthorityError, match="does not exist"):
        detect_source(str(gguf), str(tmp_path / "missing" / "tokenizer.json"))


def test_embedded_authority_record(embedded: tuple[dict[str, Any], Path]) -> None:
    auth, out = embedded
    assert auth["source"] == "gguf_embedded" and auth["path"] == str(MODEL)
    assert auth["tokenizer_model"] == "gpt2" and auth["tokenizer_pre"] == "smollm"
    assert auth["fidelity"]["level"] == "exact"
    assert (auth["bos_id"], auth["eos_id"], auth["add_bos"], auth["add_eos"]) == (1, 2, False, False)
    assert auth["vocab_size"] == 49152
    import hashlib

    assert auth["file_hash"] == hashlib.sha256(out.read_bytes()).hexdigest()
    json.dumps(auth)  # JSON-serializable as is


def test_authority_is_deterministic(embedded: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    auth, out = embedded
    again = build_authority(str(MODEL), "gguf_embedded", None, str(tmp_path / "again.json"))
    assert again == auth
    assert (tmp_path / "again.json").read_bytes() == out.read_bytes()


def test_identical_files_at_different_paths_hash_the_same(
    embedded: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    auth, out = embedded
    a = build_authority(str(MODEL), "external", str(out), str(tmp_path / "a" / "eff.json"))
    other = tmp_path / "deep" / "other" / "dir" / "tokenizer.json"
    other.parent.mkdir(parents=True)
    shutil.copyfile(out, other)
    b = build_authority(str(MODEL), "external", str(other), str(tmp_path / "b" / "eff.json"))
    assert a["path"] != b["path"]
    assert a["file_hash"] == b["file_hash"] == auth["file_hash"]
    assert a["config_hash"] == b["config_hash"] == auth["config_hash"]
    assert a["vocab_hash"] == b["vocab_hash"] == auth["vocab_hash"]
    # our own rebuild, given as external, agrees with the GGUF in every respect
    assert a["gguf_agreement"]["agrees"] is True, a["gguf_agreement"]


def test_config_hash_sees_one_merge_or_one_special_token(embedded: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    auth, out = embedded
    base = json.loads(out.read_text(encoding="utf-8"))
    # the same meaning in a different layout hashes the same
    relaid = _external(tmp_path / "relaid", json.dumps(base, indent=4, sort_keys=True).encode())
    assert relaid["config_hash"] == auth["config_hash"] and relaid["file_hash"] != auth["file_hash"]

    merges = base["model"]["merges"]
    one_merge = json.loads(json.dumps(base))
    one_merge["model"]["merges"] = [merges[1], merges[0], *merges[2:]]  # swap two ranks
    assert _external(tmp_path / "m", one_merge)["config_hash"] != auth["config_hash"]

    one_special = json.loads(json.dumps(base))
    one_special["added_tokens"][3]["special"] = not one_special["added_tokens"][3]["special"]
    assert _external(tmp_path / "s", one_special)["config_hash"] != auth["config_hash"]


def test_external_tokenizer_disagreeing_with_gguf_is_reported(
    embedded: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    auth, out = embedded
    tj = json.loads(out.read_text(encoding="utf-8"))
    # same id, different special piece (a control token: no merge refers to it)
    added = next(at for at in tj["added_tokens"] if at["id"] == 4)
    victim = added["content"]
    del tj["model"]["vocab"][victim]
    tj["model"]["vocab"]["<|parity_both|>"] = 4
    added["content"] = "<|parity_both|>"
    rec = _external(tmp_path, tj)
    ag = rec["gguf_agreement"]
    assert ag["agrees"] is False
    assert ag["n_differences"] == 1
    first = ag["first_differences"][0]
    assert first == {
        "id": 4,
        "tokenizer_json": {"text": "<|parity_both|>", "kind": "control"},
        "gguf": {"text": victim, "kind": "control"},
    }
    assert rec["vocab_hash"] != auth["vocab_hash"]
    assert ag["tokenization_probe"]["n_differ"] == 0  # the pre-tokenizer is still llama.cpp's

    # a different pre-tokenizer (no GPT-2 word split) shows up in the tokenization probe, as a GGUF
    # without tokenizer.ggml.pre (llama.cpp's default pre-tokenizer) would
    tj2 = json.loads(out.read_text(encoding="utf-8"))
    pts = tj2["pre_tokenizer"]["pretokenizers"]
    tj2["pre_tokenizer"]["pretokenizers"] = [pts[0], *pts[2:]]
    ag2 = _external(tmp_path / "pre", tj2)["gguf_agreement"]
    assert ag2["agrees"] is False and ag2["n_differences"] == 0
    assert ag2["tokenization_probe"]["n_differ"] > 0


def test_reference_vocab_fingerprint_equals_llama_cpp(embedded: tuple[dict[str, Any], Path]) -> None:
    auth, out = embedded
    ref = ReferenceTokenizer.from_files(out, auth)
    llm = llama_cpp.Llama(model_path=str(MODEL), vocab_only=True, verbose=False)
    lane = vocab_dump_from_llama_cpp(llm)
    assert compare_vocabs(ref.vocab_dump(), lane) is None
    assert vocab_fingerprint(ref.vocab_dump()) == vocab_fingerprint(lane) == auth["vocab_hash"]
    # and the ids themselves, on a chat-formatted prompt, through the one contract
    text = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    contract = TokenizationContract(add_bos=False, add_eos=False, parse_special=True)
    ours = apply_contract(ref.encode(text, parse_special=True), contract, ref.bos_id, ref.eos_id)
    theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
    assert ours == theirs
    assert ref.encode(text, parse_special=False) == llm.tokenize(text.encode(), add_bos=False, special=False)
    assert ref.decode(ours) == text
    llm.close()


def test_one_token_changed_changes_fingerprint_and_is_named(embedded: tuple[dict[str, Any], Path]) -> None:
    auth, out = embedded
    dump = ReferenceTokenizer.from_files(out, auth).vocab_dump()
    tokens = list(dump.tokens)
    i, text, kind = tokens[777]
    tokens[777] = (i, text + "x", kind)
    changed = VocabDump(
        tokens=tokens, bos_id=dump.bos_id, eos_id=dump.eos_id, add_bos=dump.add_bos, add_eos=dump.add_eos
    )
    assert vocab_fingerprint(changed) != vocab_fingerprint(dump)
    diff = compare_vocabs(dump, changed)
    assert diff is not None and diff["n_token_differences"] == 1
    assert diff["first_difference"] == {
        "id": 777,
        "a": {"text": text, "kind": kind},
        "b": {"text": text + "x", "kind": kind},
    }
    assert dump.tokens[500][2] == "normal"
    kind_changed = VocabDump(
        tokens=[*dump.tokens[:500], (500, dump.tokens[500][1], "control"), *dump.tokens[501:]],
        bos_id=dump.bos_id,
        eos_id=dump.eos_id,
        add_bos=dump.add_bos,
        add_eos=dump.add_eos,
    )
    assert compare_vocabs(dump, kind_changed)["first_difference"]["id"] == 500
    flags = VocabDump(tokens=dump.tokens, bos_id=dump.bos_id, eos_id=dump.eos_id, add_bos=True, add_eos=False)
    d = compare_vocabs(dump, flags)
    assert d is not None and d["flags"] == {"add_bos": {"a": False, "b": True}} and d["n_token_differences"] == 0


def test_dump_ids_table_marks_first_divergence() -> None:
    table = dump_ids_table([1, 2, 3, 4], ["a", "b", "c", "d"], [1, 2, 9, 4, 5], ["a", "b", "X", "d", "e"])
    lines = table.splitlines()
    assert "first divergence" in lines[3] and lines[3].split()[0] == "2"
    assert "first divergence at position 2" in lines[-1]
    assert "'X'" in lines[3] and "'c'" in lines[3]
    same = dump_ids_table([1, 2], ["a", "b"], [1, 2], ["a", "b"])
    assert "identical" in same.splitlines()[-1] and "<--" not in same


def test_auto_discovered_source_copies_the_file_as_is(embedded: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    auth, out = embedded
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    gguf = model_dir / "model.gguf"
    os.symlink(MODEL, gguf)
    shutil.copyfile(out, model_dir / "tokenizer.json")
    source, path = detect_source(str(gguf), None)
    assert source == "auto_discovered"
    rec = build_authority(str(gguf), source, path, str(tmp_path / "eff" / "tokenizer.json"))
    assert rec["source"] == "auto_discovered" and rec["path"] == str(model_dir / "tokenizer.json")
    assert (tmp_path / "eff" / "tokenizer.json").read_bytes() == out.read_bytes()
    assert rec["file_hash"] == auth["file_hash"] and rec["vocab_hash"] == auth["vocab_hash"]
    assert rec["gguf_agreement"]["agrees"] is True
    assert rec["tokenizer_model"] == "gpt2" and rec["tokenizer_pre"] == "smollm"


def test_prompt_stop_ids_are_every_token_llama_cpp_marks_eog(embedded: tuple[dict[str, Any], Path]) -> None:
    """The pipeline's stop ids for a prompt are llama.cpp's end-of-generation set for the model, all of it."""
    auth, out = embedded
    rec = pipeline.prompt_record(str(MODEL), auth, str(out), "p", {"text": "What is 2+2?", "template": "chatml"})
    llm = llama_cpp.Llama(model_path=str(MODEL), vocab_only=True, verbose=False)
    vocab = llm._model.vocab
    eog = [i for i in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    texts = {i: llama_cpp.llama_vocab_get_text(vocab, i).decode() for i in eog}
    llm.close()
    assert rec["stop_ids"] == eog
    # the fallback for a GGUF vocabulary llama.cpp's rules cannot be read here: the same rules on the tokenizer.json
    assert ReferenceTokenizer.from_files(out, auth).eog_ids() == eog
    # SmolLM2: <|endoftext|>, <|im_end|> (its EOS and end of turn) and <reponame> (a FIM token llama.cpp
    # auto-detects); the list pipeline.py kept before missed the last one
    assert texts == {0: "<|endoftext|>", 2: "<|im_end|>", 4: "<reponame>"}
