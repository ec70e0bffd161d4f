"""Template detection (AC9) and rendering, including the model's own chat template."""

from __future__ import annotations

import hashlib
from pathlib import Path

import jinja2
import pytest

from parity_both.config import embedded_model_path
from parity_both.gguf.reader import read_gguf
from parity_both.tokenize import templates


@pytest.fixture(scope="module")
def smol_md():
    return read_gguf(embedded_model_path()).metadata


def test_detect_chat_template_markers(smol_md):
    name, ev = templates.detect(smol_md, embedded_model_path())
    assert name == "chatml"
    assert ev["rule"] == "chat_template_markers" and "<|im_start|>" in ev["markers"]
    expected = hashlib.sha256(smol_md["tokenizer.chat_template"].encode("utf-8")).hexdigest()
    assert ev["chat_template_sha256"] == expected == templates.chat_template_hash(smol_md)


def test_detect_llama3_markers():
    md = {"tokenizer.chat_template": "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>' }}<|eot_id|>"}
    assert templates.detect(md)[0] == "llama3-chat"


def test_detect_unknown_template_renders_gguf():
    md = {"tokenizer.chat_template": "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"}
    name, ev = templates.detect(md)
    assert name == "gguf" and ev["rule"] == "chat_template_present_unrecognised_markers"


def test_detect_tokenizer_hints_then_path_then_fallback():
    md = {"tokenizer.ggml.tokens": ["a", "<|start_header_id|>", "<|eot_id|>"]}
    assert templates.detect(md) == (
        "llama3-chat",
        {
            "checked": ["tokenizer.ggml.tokens"],
            "rule": "special_tokens_in_vocab",
            "markers": ["<|start_header_id|>", "<|eot_id|>"],
        },
    )
    assert templates.detect({"tokenizer.ggml.pre": "llama-bpe"})[0] == "llama3-chat"
    assert templates.detect({}, "/m/Meta-Llama-3-8B.gguf")[0] == "llama3-chat"
    name, ev = templates.detect({}, "/m/some-model-instruct.gguf")
    assert (name, ev["rule"]) == ("instruct", "model_path")
    name, ev = templates.detect({}, "/m/base.gguf")
    assert (name, ev["rule"]) == ("instruct", "fallback")


def test_render_seed_templates():
    assert templates.render("raw", "hi", None, {}) == "hi"
    assert templates.render("instruct", "hi", None, {}) == "Q: hi\nA:"
    assert templates.render("instruct", "hi", "Be brief.", {}) == "System: Be brief.\n\nQ: hi\nA:"
    l3 = templates.render("llama3-chat", "hi", None, {})
    assert l3.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant")
    assert l3.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert templates.render("chatml", "hi", None, {}) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_render_gguf_template_matches_hand_rendering(smol_md):
    text = templates.render("gguf", "hi", None, smol_md)
    # SmolLM2's template inserts its default system prompt when none is given.
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    text = templates.render("gguf", "hi", "Be brief.", smol_md)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_gguf_template_is_sandboxed():
    md = {"tokenizer.chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}
    with pytest.raises(templates.TemplateError, match="is unsafe") as e:
        templates.render("gguf", "hi", None, md)
    assert isinstance(e.value.__cause__, jinja2.exceptions.SecurityError)


def test_gguf_template_missing_is_a_clear_error():
    with pytest.raises(templates.TemplateError, match="needs tokenizer.chat_template"):
        templates.render("gguf", "hi", None, {})


def test_contract_avoids_duplicate_bos():
    c, notes = templates.contract_for("gguf", "<s>hello", vocab_add_bos=True, vocab_add_eos=False, bos_text="<s>")
    assert c.add_bos is False and c.parse_special is True
    assert any("duplicate" in n for n in notes)
    c, _ = templates.contract_for("raw", "<s>hello", vocab_add_bos=True, vocab_add_eos=False, bos_text="<s>")
    assert c.add_bos is True and c.parse_special is False  # plain text: "<s>" is not the BOS token
    c, _ = templates.contract_for(
        "llama3-chat", "<|begin_of_text|>x", vocab_add_bos=True, vocab_add_eos=False, bos_text="<|begin_of_text|>"
    )
    assert c.add_bos is False and c.parse_special is True


def test_gemma_template_detected_and_rendered() -> None:
    """Gemma GGUFs (e.g. gemma-3-270m) may ship no chat template: its turn markers in the vocabulary pick
    `gemma`; Gemma has no system role, so the system text leads the user turn."""
    md = {"tokenizer.ggml.tokens": ["<pad>", "<bos>", "<start_of_turn>", "<end_of_turn>", "a"]}
    name, evidence = templates.detect(md)
    assert (name, evidence["rule"]) == ("gemma", "special_tokens_in_vocab")
    text = templates.render("gemma", "Hi?", "Be brief.", md)
    assert text == "<start_of_turn>user\nBe brief.\n\nHi?<end_of_turn>\n<start_of_turn>model\n"


def test_template_lists_agree() -> None:
    """One list of templates: the CLI's choices and the config schema's enum are the module's."""
    import yaml

    from parity_both.cli import TEMPLATE_CHOICES

    schema = yaml.safe_load((Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml").read_text())
    enum = schema["properties"]["prompts"]["additionalProperties"]["properties"]["template"]["enum"]
    assert tuple(enum) == TEMPLATE_CHOICES == ("auto", *templates.TEMPLATES)
