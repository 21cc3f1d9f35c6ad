# Stage 6: the analysis feed. Response by arm (intention to treat; the only step
# that reads the allocation).


rule response_by_arm:
    input:
        response=f"{RESULTS}/response.tsv",
        volumes=f"{RESULTS}/volumes.tsv",
        allocation=config["allocation"] or [],
    output:
        table=report(
            f"{RESULTS}/response_by_arm.tsv",
            caption="../report/response_by_arm.rst",
            category="Response by arm",
        ),
        dictionary=f"{RESULTS}/response_by_arm.json",
    params:
        arms=" ".join(f"--arm {shlex.quote(a)}" for a in config["arms"] or []),
        # Follow-up months the study has series for (not every month the config could name).
        months=" ".join(f"--month {m}" for m in sorted({s.month for s in STUDY.slots if s.month})),
        primary_month=config["primary_month"],
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/response_by_arm.log",
    shell:
        "khe-vol arms --response {input.response:q} --volumes {input.volumes:q} "
        "--allocation {input.allocation:q} {params.arms} {params.months} "
        "--primary-month {params.primary_month} --out {output.table:q} > {log:q} 2>&1"


rule response_by_arm_page:
    input:
        f"{RESULTS}/response_by_arm.tsv",
    output:
        page=report(
            f"{RESULTS}/figures/response_by_arm.html",
            caption="../report/response_by_arm_table.rst",
            category="Response by arm",
        ),
        summary=f"{RESULTS}/figures/response_by_arm_summary.html",
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/response_by_arm_page.log",
    shell:
        "khe-vol report-page --kind response_by_arm --table {input:q} --out {output.page:q} "
        "--summary {output.summary:q} > {log:q} 2>&1"
