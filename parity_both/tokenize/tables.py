"""llama.cpp's tokenizer tables, as data (llama.cpp as vendored by llama-cpp-python 0.3.36).

Extracted from src/llama-vocab.cpp and src/unicode.cpp; tests/test_tokenizer_fidelity.py re-extracts the
pre-tokenizer regexes and pre-type names from the sdist and compares them with these.
"""

from __future__ import annotations

from functools import cache

LLAMA_CPP_REFERENCE = "llama.cpp as vendored by llama-cpp-python 0.3.36 (src/llama-vocab.cpp, unicode.cpp)"

# tokenizer.ggml.model -> (llama.cpp vocab type, default BOS, EOS, UNK ids) (llama_vocab::impl::load).
TOKENIZER_MODELS: dict[str, tuple[str, int | None, int | None, int | None]] = {
    "llama": ("spm", 1, 2, 0),
    "gpt2": ("bpe", 11, 11, None),
    "gemma4": ("bpe", None, None, None),
}
# Tokenizer models llama.cpp knows but this package does not rebuild (WPM, UGM, RWKV, ...).
UNREBUILT_TOKENIZER_MODELS = frozenset(
    ["bert", "t5", "rwkv", "plamo2", "hybriddna", "whitespace", "no_vocab", "none", "test"]
)

# ---------------------------------------------------------------------------------------------
# Pre-tokenizer regexes, from llm_tokenizer_bpe's constructor (C++ escapes resolved):
# (pre types sharing the regexes, the regexes in the order llama.cpp applies them).
# ---------------------------------------------------------------------------------------------
_PRE_TYPE_GROUPS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
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
        ("[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",),
    ),
    (
        ("AFMOE",),
        (
            "\\p{AFMoE_digits}",
            "[一-鿿㐀-䶿豈-\ufaff\u3040-ゟ゠-ヿ･-ﾟ⼀-\u2fdfเ-\u0e7f\u0e80-\u0effក-\u17ffက-႟ꩠ-ꩿꧠ-\ua9ff가-\ud7afᄀ-ᇿ]+",
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
)
PRE_TYPE_REGEXES: dict[str, tuple[str, ...]] = {t: regexes for types, regexes in _PRE_TYPE_GROUPS for t in types}
# Pre types whose BPE runs on raw UTF-8 (no GPT-2 byte-to-unicode mapping).
RAW_UTF8_PRE_TYPES = frozenset(["GEMMA4", "SARVAM_MOE", "WHITESPACE"])

# tokenizer.ggml.pre value -> (pre type, flags llama.cpp sets for it)
PRE_NAMES: dict[str, tuple[str, dict[str, bool]]] = {
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
UNSUPPORTED_PRE_TYPES = {
    "KIMI_K2": "custom Han/K2 splitter in unicode.cpp",
    "AFMOE": "custom digit grouping (\\p{AFMoE_digits}) in unicode.cpp",
    "TINY_AYA": "custom right-to-left digit grouping in unicode.cpp",
    "SUPERBPE": "zero-width lookahead split, which std::regex and onig iterate differently",
    "WHITESPACE": "whitespace tokenizer model (no BPE merges on byte-level text)",
}

# llama.cpp's regex engine maps \p{Lu}/\p{Ll}/\p{Lt}/\p{Lm}/\p{Lo} to ALL letters (k_ucat_enum).
LETTER_SUBCATEGORIES = ("\\p{Lu}", "\\p{Ll}", "\\p{Lt}", "\\p{Lm}", "\\p{Lo}")

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
AUTO_DETECT = {
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
DEPRECATED_FIM_KEYS = {
    "fim_pre": "tokenizer.ggml.prefix_token_id",
    "fim_suf": "tokenizer.ggml.suffix_token_id",
    "fim_mid": "tokenizer.ggml.middle_token_id",
}

# gpt-oss pieces llama.cpp always renders (forced to USER_DEFINED at load time).
ALWAYS_RENDERED_TEXTS = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")

# tokenizers' regex engine (onig) knows a newer Unicode than llama.cpp 0.3.36's unicode-data.cpp:
# these code points are unassigned (Cn) for llama.cpp but letters/numbers/marks/... for onig.
# Excluding them from every \p{..} class makes onig classify them as llama.cpp does. Derived by
# comparing both tables over all code points (test_unicode_categories_match_llama_cpp re-checks it).
NEWER_THAN_LLAMA_CPP_UNICODE = (
    "0897 1B4E-1B4F 1B7F 1C89-1C8A 2427-2429 31E4-31E5 A7CB-A7CD A7DA-A7DC 105C0-105F3 "
    "10D40-10D65 10D69-10D85 10D8E-10D8F 10EC2-10EC4 10EFC 11380-11389 1138B 1138E 11390-113B5 "
    "113B7-113C0 113C2 113C5 113C7-113CA 113CC-113D5 113D7-113D8 113E1-113E2 116D0-116E3 "
    "11BC0-11BE1 11BF0-11BF9 11F5A 13460-143FA 16100-16139 16D40-16D79 18CFF 1CC00-1CCF9 "
    "1CD00-1CEB3 1E5D0-1E5FA 1E5FF 1F8B2-1F8BB 1F8C0-1F8C1 1FA89 1FA8F 1FABE 1FAC6 1FADC 1FADF "
    "1FAE9 1FBCB-1FBEF "
)


@cache
def byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable character -> byte map (llama.cpp's unicode_utf8_to_byte_map)."""
    bs = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}
