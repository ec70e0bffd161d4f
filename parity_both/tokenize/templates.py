"""Prompt templates, their auto-detection, and the tokenization contract each one implies.

The seed's three templates (raw, instruct, llama3-chat) plus chatml and `gguf` (the model's own
`tokenizer.chat_template`, rendered in jinja2's sandbox). Detection records its evidence so a
receipt can say WHY a template was chosen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from parity_both.lanes.base import TokenizationContract

TEMPLATES = ("raw", "instruct", "llama3-chat", "chatml", "gemma", "gguf")
DEFAULT_LLAMA3_SYSTEM = "You are a helpful assistant"

_LLAMA3_MARKERS = ("<|start_header_id|>", "<|eot_id|>")
_CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")
_GEMMA_MARKERS = ("<start_of_turn>", "<end_of_turn>")
# the templates recognised by their markers, in the order they are tried
_MARKED = (("llama3-chat", _LLAMA3_MARKERS), ("chatml", _CHATML_MARKERS), ("gemma", _GEMMA_MARKERS))


class TemplateError(ValueError):
    """A template that cannot be used for this model; the message says what to do."""


@dataclass(frozen=True)
class FormattedPrompt:
    template: str
    text: str
    contract: TokenizationContract
    notes: tuple[str, ...]  # e.g. "BOS already in the text: contract add_bos=false"


def chat_template_hash(metadata: Mapping[str, Any]) -> str | None:
    tpl = metadata.get("tokenizer.chat_template")
    return hashlib.sha256(tpl.encode("utf-8")).hexdigest() if isinstance(tpl, str) else None


def _token_texts(metadata: Mapping[str, Any]) -> Sequence[str]:
    toks = metadata.get("tokenizer.ggml.tokens")
    return toks if isinstance(toks, list) else []


def detect(metadata: Mapping[str, Any], model_path: str | None = None) -> tuple[str, dict[str, Any]]:
    """Pick a template from GGUF metadata: chat-template markers, then tokenizer hints, then the
    model path; fall back to `instruct`. Returns (template, evidence)."""
    evidence: dict[str, Any] = {"checked": []}
    tpl = metadata.get("tokenizer.chat_template")
    if isinstance(tpl, str) and tpl.strip():
        evidence["checked"].append("tokenizer.chat_template")
        evidence["chat_template_sha256"] = chat_template_hash(metadata)
        for name, markers in _MARKED:
            found = [m for m in markers if m in tpl]
            if found:
                evidence.update(rule="chat_template_markers", markers=found)
                return name, evidence
        evidence.update(rule="chat_template_present_unrecognised_markers")
        return "gguf", evidence
    evidence["checked"].append("tokenizer.ggml.tokens")
    tokens = set(_token_texts(metadata))
    for name, markers in _MARKED:
        found = [m for m in markers if m in tokens]
        if len(found) == len(markers):
            evidence.update(rule="special_tokens_in_vocab", markers=found)
            return name, evidence
    pre = metadata.get("tokenizer.ggml.pre")
    evidence["checked"].append("tokenizer.ggml.pre")
    if pre in ("llama3", "llama-bpe"):
        evidence.update(rule="tokenizer_pre", tokenizer_pre=pre)
        return "llama3-chat", evidence
    if model_path:
        evidence["checked"].append("model_path")
        low = model_path.lower().replace("_", "-")
        if "llama-3" in low or "llama3" in low:
            evidence.update(rule="model_path", matched="llama3")
            return "llama3-chat", evidence
        for word in ("instruct", "chat", "-it."):
            if word in low:
                evidence.update(rule="model_path", matched=word)
                return "instruct", evidence
    evidence.update(rule="fallback")
    return "instruct", evidence


def render(template: str, prompt: str, system_prompt: str | None, metadata: Mapping[str, Any]) -> str:
    """The formatted prompt text (before tokenization)."""
    if template == "raw":
        return prompt
    if template == "instruct":
        head = f"System: {system_prompt}\n\n" if system_prompt else ""
        return f"{head}Q: {prompt}\nA:"
    if template == "llama3-chat":
        sys_text = system_prompt or DEFAULT_LLAMA3_SYSTEM
        return (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            f"{sys_text}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
    if template == "chatml":
        head = f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt else ""
        return f"{head}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    if template == "gemma":  # Gemma has no system role: its chat template prepends the system text to the user turn
        user = f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
        return f"<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n"
    if template == "gguf":
        return _render_gguf(prompt, system_prompt, metadata)
    raise TemplateError(f"unknown prompt template {template!r}; use one of {', '.join(TEMPLATES)} or auto")


def _render_gguf(prompt: str, system_prompt: str | None, metadata: Mapping[str, Any]) -> str:
    from jinja2 import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tpl = metadata.get("tokenizer.chat_template")
    if not isinstance(tpl, str) or not tpl.strip():
        raise TemplateError(
            "template 'gguf' needs tokenizer.chat_template in the GGUF; this model has none "
            "(use --prompt-template auto, chatml, llama3-chat, instruct or raw)"
        )
    tokens = _token_texts(metadata)

    def tok(key: str) -> str:
        i = metadata.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

    def raise_exception(msg: str) -> None:
        raise TemplateError(f"the GGUF chat template refused the conversation: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]
    try:
        return env.from_string(tpl).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=tok("tokenizer.ggml.bos_token_id"),
            eos_token=tok("tokenizer.ggml.eos_token_id"),
        )
    except JinjaError as e:
        raise TemplateError(f"cannot render the GGUF chat template: {e}") from e


def contract_for(
    template: str, text: str, *, vocab_add_bos: bool, vocab_add_eos: bool, bos_text: str | None
) -> tuple[TokenizationContract, tuple[str, ...]]:
    """The explicit (add_bos, add_eos, parse_special) for a formatted prompt, and why."""
    notes: list[str] = []
    parse_special = template in ("llama3-chat", "chatml", "gemma", "gguf")
    add_bos = vocab_add_bos
    if template == "llama3-chat":
        add_bos = False
        notes.append("llama3-chat text begins with <|begin_of_text|>: add_bos=false")
    elif add_bos and parse_special and bos_text and text.startswith(bos_text):
        add_bos = False
        notes.append(f"formatted text already begins with BOS {bos_text!r}: add_bos=false to avoid a duplicate")
    notes.append(
        f"parse_special={'true' if parse_special else 'false'}: "
        + ("template control tokens must map to special ids" if parse_special else "prompt text is plain text")
    )
    notes.append(f"add_bos={'true' if add_bos else 'false'} (vocab add_bos={str(vocab_add_bos).lower()})")
    return TokenizationContract(add_bos=add_bos, add_eos=vocab_add_eos, parse_special=parse_special), tuple(notes)


def format_prompt(
    template: str,
    prompt: str,
    system_prompt: str | None,
    metadata: Mapping[str, Any],
    *,
    vocab_add_bos: bool,
    vocab_add_eos: bool,
    bos_text: str | None,
) -> FormattedPrompt:
    text = render(template, prompt, system_prompt, metadata)
    contract, notes = contract_for(
        template, text, vocab_add_bos=vocab_add_bos, vocab_add_eos=vocab_add_eos, bos_text=bos_text
    )
    return FormattedPrompt(template, text, contract, notes)
