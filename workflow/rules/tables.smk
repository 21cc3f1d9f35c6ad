# Stage 3: cohort tables (volumes.tsv, response.tsv and their data dictionaries).


rule tables:
    input:
        records=table_records(),
    output:
        volumes=report(f"{RESULTS}/volumes.tsv", caption="../report/volumes.rst", category="Tables"),
        volumes_dictionary=f"{RESULTS}/volumes.json",
        response=report(f"{RESULTS}/response.tsv", caption="../report/response.rst", category="Tables"),
        response_dictionary=f"{RESULTS}/response.json",
    params:
        baseline=BASELINE_ID,
        results_dir=lambda wildcards, output: str(Path(output.volumes).parent),
        config_json=shlex.quote(json.dumps(config, sort_keys=True)),
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/tables.log",
    shell:
        "khe-vol tables --results-dir {params.results_dir:q} --baseline-session {params.baseline} "
        "--config-json {params.config_json} "
        "{input.records:q} > {log:q} 2>&1"
