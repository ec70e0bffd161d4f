"""Config defaults live in the schema only: Snakemake's validate and config.with_defaults fill the same."""

from __future__ import annotations

import copy

import pytest
import yaml

from parity_both import config as pbconfig

REPO_CONFIG = pbconfig.SCHEMA_PATH.parent.parent / "config.yaml"
MINIMAL = {
    "models": {"m": {"gguf": "embedded"}, "f": {"fixture": {"arch": "bitnet", "weight_type": "TQ2_0"}}},
    "prompts": {"p": {"text": "hi"}},
    "lanes": ["llama"],
}


def test_with_defaults_fills_what_snakemake_validate_fills():
    from snakemake.utils import validate

    for cfg in (MINIMAL, yaml.safe_load(REPO_CONFIG.read_text())):
        by_snakemake = copy.deepcopy(cfg)
        validate(by_snakemake, str(pbconfig.SCHEMA_PATH))
        assert pbconfig.with_defaults(cfg) == by_snakemake


def test_documented_defaults():
    """The values README and issue 10 document (not read back from the schema)."""
    cfg = pbconfig.with_defaults(MINIMAL)
    assert cfg["max_tokens"] == 8 and cfg["threads"] == 1 and cfg["out_dir"] == "results" and cfg["gates"] == []
    assert cfg["reference"] == {"mode": "exact", "activation": None, "prepared_budget": 4}
    assert cfg["prompts"]["p"] == {"text": "hi", "template": "auto", "system_prompt": None, "window": 256, "windows": 1}
    assert cfg["models"]["f"]["fixture"] == {"arch": "bitnet", "weight_type": "TQ2_0", "size": "tiny", "seed": 0}
    quantized = {
        "cos_tol": 0.95,
        "nmse_max": 0.1,
        "kl_max": 0.1,
        "mean_kl_max": 0.02,
        "topk_min": 0.6,
        "same_top1_min": 0.75,
        "greedy_contained": True,
    }
    assert pbconfig.thresholds(cfg, "ggml") == quantized
    assert pbconfig.thresholds(cfg, "exact") == {**quantized, "mean_kl_max": 0.05}  # README "Thresholds": at depth
    graph = pbconfig.thresholds(cfg, "graph")
    assert graph["cos_tol"] == 0.999 and graph["nmse_max"] == 1e-5 and graph["mean_kl_max"] == 1e-5
    assert MINIMAL["models"]["m"] == {"gguf": "embedded"}  # the caller's config is not modified
    f16 = pbconfig.thresholds(cfg, "graph_f16")  # an F16 twin: only the mean KL differs (README "Graph parity")
    assert f16 == {**graph, "mean_kl_max": 5e-5}
    sets = {k: pbconfig.thresholds(cfg, k) for k in pbconfig.GRAPH_SETS}
    assert pbconfig.twin_graph_thresholds(sets, {"dtype": "F16"}) == f16
    assert pbconfig.twin_graph_thresholds(sets, {"dtype": "F32"}) == graph
    assert (
        pbconfig.twin_graph_thresholds(sets, {"dtype": "BF16"}) == pbconfig.twin_graph_thresholds(sets, None) == graph
    )


def test_overrides_metrics_and_twin():
    cfg = pbconfig.with_defaults(
        {
            **MINIMAL,
            "metrics": ["kl"],
            "thresholds": {"graph": {"kl_max": 0.5}},
            "models": {"m": {"gguf": "embedded", "twin": False}, "n": {"gguf": "embedded", "twin": "F16"}},
        }
    )
    th = pbconfig.thresholds(cfg, "graph")
    assert th["kl_max"] == 0.5 and th["mean_kl_max"] == 1e-5  # the rest of the set keeps its defaults
    assert th["cos_tol"] is None and th["topk_min"] is None and th["greedy_contained"] is False
    assert pbconfig.twin_dtype(cfg, "m") is None and pbconfig.twin_dtype(cfg, "n") == "F16"
    assert yaml.safe_load("twin: off") == {"twin": False}  # what `twin: off` in YAML is


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"max_tokens": -1}, "config max_tokens"),
        ({"thresholds": {"graph": {"cos_tol": 2}}}, "config thresholds.graph.cos_tol"),
        ({"thresholds": {"fp8": {}}}, "config thresholds"),
        ({"models": {"m": {"gguf": "embedded", "twin": "F8"}}}, "config models.m.twin"),
    ],
)
def test_invalid_config_is_one_line_naming_the_field(bad, where):
    with pytest.raises(pbconfig.ConfigError, match=f"^{where}: ") as e:
        pbconfig.with_defaults({**MINIMAL, **bad})
    assert "\n" not in str(e.value)
