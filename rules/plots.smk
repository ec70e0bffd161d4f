# The HTML report (issue 14): one figure pair per receipt, made by its own rule so it reruns only when that
# receipt changes, and the summary table. Build with
#   snakemake report_plots && snakemake report_plots --report results/report.html      (make report)


report: "../report/workflow.rst"


rule plot_receipt:
    """Per-position KL, max |delta logit| and top-1 agreement (both verdicts); per-layer NMSE / worst nodes."""
    input:
        receipt=f"{OUT}/{{model}}/receipts/{{lane}}/{{prompt}}.json",
    output:
        positions=report(
            f"{OUT}/report/{{model}}/{{lane}}/{{prompt}}.positions.png",
            caption="../report/positions.rst",
            category="Per position",
            subcategory="{model}",
            labels={"model": "{model}", "lane": "{lane}", "prompt": "{prompt}", "figure": "positions"},
        ),
        layers=report(
            f"{OUT}/report/{{model}}/{{lane}}/{{prompt}}.layers.png",
            caption="../report/layers.rst",
            category="Per layer",
            subcategory="{model}",
            labels={"model": "{model}", "lane": "{lane}", "prompt": "{prompt}", "figure": "layers"},
        ),
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/{{model}}/report/{{lane}}/{{prompt}}.log",
    benchmark:
        f"{OUT}/benchmarks/{{model}}/report/{{lane}}/{{prompt}}.tsv"
    threads: 1
    resources:
        **RES["plot_receipt"],
    script:
        "../scripts/plot_receipt.py"


rule report_table:
    """The summary table: graph and quantized verdicts per model, lane and prompt."""
    input:
        f"{OUT}/summary.json",
    output:
        report(
            f"{OUT}/report/summary_table.html",
            caption="../report/summary.rst",
            category="Summary",
            labels={"table": "verdicts"},
        ),
    conda:
        "../envs/parity-both.yaml"
    log:
        f"{OUT}/logs/report_table.log",
    benchmark:
        f"{OUT}/benchmarks/report_table.tsv"
    threads: 1
    resources:
        **RES["report_table"],
    script:
        "../scripts/report_table.py"


rule report_plots:
    """Every figure of the report (the target `make report` builds before `snakemake --report`)."""
    input:
        f"{OUT}/report/summary_table.html",
        [
            f"{OUT}/report/{model}/{lane}/{prompt}.{fig}.png"
            for model in MODELS
            for lane in LANES
            for prompt in PROMPTS
            for fig in ("positions", "layers")
        ],
