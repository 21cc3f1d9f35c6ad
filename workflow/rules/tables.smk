# Stage 3: cohort tables (volumes.tsv, response.tsv and their data dictionaries).


rule tables:
    input:
        records=table_records(),
    output:
        volumes=f"{RESULTS}/volumes.tsv",
        volumes_dictionary=f"{RESULTS}/volumes.json",
        response=f"{RESULTS}/response.tsv",
        response_dictionary=f"{RESULTS}/response.json",
    params:
        baseline=BASELINE_ID,
        results_dir=lambda wildcards, output: str(Path(output.volumes).parent),
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/tables.log",
    shell:
        "khe-vol tables --results-dir {params.results_dir:q} --baseline-session {params.baseline} "
        "{input.records:q} > {log:q} 2>&1"
