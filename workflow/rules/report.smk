# Stage 7: what a run leaves for people: figures and QC montages for the
# Snakemake report (`snakemake --report`), one workbook an analyst opens
# directly, and provenance.json (software, config, inputs and the checksum of
# every result).


rule figures:
    input:
        response=f"{RESULTS}/response.tsv",
        volumes=f"{RESULTS}/volumes.tsv",
        allocation=config["allocation"] or [],
    output:
        waterfall=report(
            f"{RESULTS}/figures/waterfall.png",
            caption="../report/waterfall.rst",
            category="Response",
        ),
        spaghetti=report(
            f"{RESULTS}/figures/spaghetti.png",
            caption="../report/spaghetti.rst",
            category="Response",
        ),
        counts=report(
            f"{RESULTS}/figures/category_counts.png",
            caption="../report/category_counts.rst",
            category="Response",
        ),
    params:
        out_dir=lambda wildcards, output: str(Path(output.waterfall).parent),
        allocation=lambda wildcards, input: (
            f"--allocation {shlex.quote(input.allocation)} "
            + " ".join(f"--arm {shlex.quote(a)}" for a in config["arms"] or [])
            if input.allocation
            else ""
        ),
        primary_month=config["primary_month"],
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/figures.log",
    shell:
        "khe-vol figures --response {input.response:q} --volumes {input.volumes:q} {params.allocation} "
        "--primary-month {params.primary_month} --out-dir {params.out_dir:q} > {log:q} 2>&1"


# The tables readable inside the report (it offers TSVs only as downloads), and
# a summary for its front page (workflow/report/workflow.rst includes it).
rule response_page:
    input:
        f"{RESULTS}/response.tsv",
    output:
        page=report(
            f"{RESULTS}/figures/response_table.html",
            caption="../report/response_table.rst",
            category="Response",
        ),
        summary=f"{RESULTS}/figures/response_summary.html",
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/response_page.log",
    shell:
        "khe-vol report-page --kind response --table {input:q} --out {output.page:q} "
        "--summary {output.summary:q} > {log:q} 2>&1"


# One job per participant, so montages are drawn while other series are still
# being measured and a changed series redraws only its participant's.
rule montages:
    input:
        unpack(participant_series),
    output:
        report(
            directory(montage_dir("{participant}")),
            patterns=["{name}.png"],
            caption="../report/qc_montage.rst",
            category="QC montages",
        ),
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/montages/{{participant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/montages/{{participant}}.tsv"
    shell:
        "khe-vol montages --out-dir {output:q} {input.records:q} > {log:q} 2>&1"


# One page per participant for the unblinded core lab (it names the participant:
# under participants/, never under qa/, which the reader packages are made of).
rule participant_page:
    input:
        unpack(participant_series),
        volumes=f"{RESULTS}/volumes.tsv",
        response=f"{RESULTS}/response.tsv",
        derivatives=f"{RESULTS}/derivatives",
        final=[f"{WORK}/qa/final_records.json"] if READERS else [],
    output:
        html=participant_page_path("{participant}", "html"),
        pdf=participant_page_path("{participant}", "pdf"),
    params:
        final=lambda wildcards, input: f"--final-records {shlex.quote(input.final[0])}" if input.final else "",
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/participants/{{participant}}.log",
    shell:
        "khe-vol participant-page --participant {wildcards.participant:q} --volumes {input.volumes:q} "
        "--response {input.response:q} --derivatives {input.derivatives:q} {params.final} "
        "--out-html {output.html:q} --out-pdf {output.pdf:q} {input.records:q} > {log:q} 2>&1"


rule workbook:
    input:
        tables=workbook_tables(),
    output:
        report(f"{RESULTS}/khe_vol_results.xlsx", caption="../report/workbook.rst", category="Tables"),
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/workbook.log",
    shell:
        "khe-vol workbook --out {output:q} {input.tables:q} > {log:q} 2>&1"


rule provenance:
    input:
        records=table_records(),
        results=provenance_outputs(),
    output:
        report(f"{RESULTS}/provenance.json", caption="../report/provenance.rst", category="Provenance"),
    params:
        config_json=shlex.quote(json.dumps(config, sort_keys=True)),
        outputs=lambda wildcards, input: " ".join(f"--output {shlex.quote(p)}" for p in input.results),
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/provenance.log",
    shell:
        "khe-vol provenance --out {output:q} --config-json {params.config_json} {params.outputs} "
        "{input.records:q} > {log:q} 2>&1"
