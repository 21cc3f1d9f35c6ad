# Stage 6b (only with dicom_export): each series' final mask as a DICOM SEG and
# its measurements as a TID 1500 SR, on the source DICOM series the uid map of
# `khe-vol import` names (khe_vol/dicom/export.py). One job for the cohort: it
# needs the cohort tables (volume, response category) anyway.


rule dicom_export:
    input:
        records=table_records(),
        derivatives=f"{RESULTS}/derivatives",
        volumes=f"{RESULTS}/volumes.tsv",
        response=f"{RESULTS}/response.tsv",
        uid_map=config["dicom_uid_map"],
    output:
        directory(f"{RESULTS}/dicom"),
    params:
        imaging_dir=config["imaging_dir"],
        trial=shlex.quote(json.dumps(config["dicom_trial"], sort_keys=True)),
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/dicom_export.log",
    shell:
        "khe-vol dicom-export --uid-map {input.uid_map:q} --imaging-dir {params.imaging_dir:q} "
        "--derivatives {input.derivatives:q} --volumes {input.volumes:q} --response {input.response:q} "
        "--trial-json {params.trial} --out-dir {output:q} {input.records:q} > {log:q} 2>&1"
