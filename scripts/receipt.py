from parity_both import pipeline
from parity_both.jobs import run_job


def main() -> None:
    sm = snakemake  # noqa: F821
    receipt = pipeline.make_receipt(
        lane=sm.wildcards.lane,
        model_name=sm.wildcards.model,
        model_json=sm.input.model,
        authority_json=sm.input.authority,
        tokenizer_json=sm.input.tokenizer,
        prompt_json=sm.input.prompt,
        reference_npz=sm.input.reference,
        lane_npz=sm.input.lane,
        lane_vocab_json=sm.input.lane_vocab,
        backend_json=sm.input.backend,
        thresholds=sm.params.thresholds,
        mode=sm.params.mode,
        gates=sm.params.gates,
        lane_gguf=sm.params.lane_gguf,
        transcode_json=sm.input.transcode[0] if sm.input.transcode else None,
        twin_reference_npz=sm.input.get("twin_reference"),
        twin_lane_npz=sm.input.get("twin_lane"),
        twin_record_json=sm.input.get("twin_record"),
        localization_json=sm.input.get("localization"),
        kernels_json=sm.input.get("kernels"),
    )
    pipeline.write_json(sm.output[0], receipt)


run_job(snakemake, main)  # noqa: F821
