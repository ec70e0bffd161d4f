# parity-both: a reproducible proof (or disproof) that llama.cpp-family engines compute what an
# independent NumPy reference computes, token for token and logit for logit.
#
#   snakemake results/summary.json          (profile profiles/default sets cores, checksums)
#   snakemake --cores 2                     (lanes and prompts in parallel)

from snakemake.utils import min_version

min_version("9.0")


# The parity-both command passes a complete config (standalone: true); otherwise read config.yaml.
if not config.get("standalone"):

    configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/resources.smk"
include: "rules/backends.smk"
include: "rules/model.smk"
include: "rules/tokenize.smk"
include: "rules/reference.smk"
include: "rules/lanes.smk"
include: "rules/report.smk"
include: "rules/plots.smk"
include: "rules/klbase.smk"


rule all:
    input:
        f"{OUT}/summary.json",
        f"{OUT}/summary.txt",
    default_target: True
