# Stage 1: report every problem of the study folder (headers only; voxel data
# is validated by each series job).


rule check_study:
    input:
        [str(s.path) for s in STUDY.slots if s.path is not None],
    output:
        report=f"{RESULTS}/check.tsv",
        dictionary=f"{RESULTS}/check.json",
    params:
        config=json.dumps(config, sort_keys=True),
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/check_study.log",
    shell:
        "khe-vol check --config-json {params.config:q} --headers-only --no-fail "
        "--report {output.report:q} > {log:q} 2>&1"
