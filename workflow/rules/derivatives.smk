# Stage 4: the BIDS derivatives dataset of lesion masks with provenance sidecars.


rule derivatives:
    input:
        records=all_records(),
        masks=all_masks(),
        edited=[f"{WORK}/qa/edited"] if READERS else [],
    output:
        directory(f"{RESULTS}/derivatives"),
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/derivatives.log",
    params:
        edited=f"--edited-dir {WORK}/qa/edited" if READERS else "",
    shell:
        "khe-vol derivatives --out-dir {output:q} {params.edited} {input.records:q} > {log:q} 2>&1"
