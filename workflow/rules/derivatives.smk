# Stage 4: the BIDS derivatives dataset of lesion masks with provenance sidecars.


rule derivatives:
    input:
        records=all_records(),
        masks=all_masks(),
    output:
        directory(f"{RESULTS}/derivatives"),
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/derivatives.log",
    shell:
        "khe-vol derivatives --out-dir {output:q} {input.records:q} > {log:q} 2>&1"
