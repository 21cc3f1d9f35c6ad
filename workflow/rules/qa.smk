# Stage 5: blinded reader QA. Reader packages under qa/ (nothing identifying),
# the unblinding key under blinding/, the reads imported back (final volumes,
# adjudication of disagreements, agreement statistics). Only with `readers`.


wildcard_constraints:
    reader="[A-Za-z0-9_-]+",


rule qa_reader_baseline:
    """A reader's seeded baseline (their read of a baseline with no seed), to track their follow-ups from."""
    input:
        baseline=lambda wildcards: record_path(wildcards.participant, BASELINE_ID),
    output:
        record=reader_baseline_record("{reader}", "{participant}"),
        mask=reader_baseline_mask("{reader}", "{participant}"),
    params:
        db=lambda wildcards: str(SEEDED[(wildcards.reader, wildcards.participant)].db_path),
        code=lambda wildcards: SEEDED[(wildcards.reader, wildcards.participant)].case_code,
        # Not the database file as an input (every read would rerun the tracking):
        # the fingerprint of this read's mask and clicks reruns it when they change.
        fingerprint=lambda wildcards: SEEDED[(wildcards.reader, wildcards.participant)].fingerprint,
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/qa_reader_baseline/{{reader}}_{{participant}}.log",
    shell:
        "khe-vol qa reader-baseline --db {params.db:q} --reader {wildcards.reader} --case-code {params.code} "
        "--fingerprint {params.fingerprint} --baseline-record {input.baseline:q} --out-record {output.record:q} "
        "--out-mask {output.mask:q} > {log:q} 2>&1"


rule measure_reader_series:
    """A follow-up tracked from one reader's seeded baseline, for that reader's worklist only."""
    input:
        unpack(series_inputs),
    output:
        record=series_record_path(reader_work("{reader}"), "{participant}", "{session}"),
        mask=series_mask_path(reader_work("{reader}"), "{participant}", "{session}"),
    params:
        args=series_args,
    message:
        "measuring {wildcards.participant} {wildcards.session} from {wildcards.reader}'s seeded baseline"
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/measure_reader_series/{{reader}}_{{participant}}_{{session}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/measure_reader_series/{{reader}}_{{participant}}_{{session}}.tsv"
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    shell:
        "khe-vol series {params.args} --threads {threads} --record {output.record:q} --mask {output.mask:q} > {log:q} 2>&1"


rule qa_package:
    input:
        records=all_records(),
        masks=all_masks(),
        reader_records=reader_records(),
        # Its arm and site names go to blinding/study_words.tsv: the reader app and qa_audit both forbid them.
        allocation=config["allocation"] or [],
    output:
        packages=[directory(reader_package(r)) for r in READERS],
        key=f"{BLINDING}/key.tsv",
    params:
        results_dir=lambda wildcards, output: str(Path(output.key).parents[1]),
        readers=" ".join(f"--reader {r}" for r in READERS),
        seed=config["qa_seed"],
        display=DISPLAY_ARGS,
        reading_mode=config["reading_mode"],
        reader_records=reader_record_args,
        # A string (not a function): a change of the arms is a params change, which reruns the packaging.
        arms=" ".join(f"--arm {shlex.quote(a)}" for a in config["arms"] or []),
        allocation=lambda wildcards, input: f"--allocation {shlex.quote(input.allocation)}" if input.allocation else "",
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/qa_package.log",
    shell:
        "khe-vol qa package --results-dir {params.results_dir:q} {params.readers} --seed {params.seed} {params.display} "
        "--reading-mode {params.reading_mode} {params.reader_records} {params.allocation} {params.arms} --key {output.key:q} "
        "{input.records:q} > {log:q} 2>&1"


if ADJUDICATOR:

    rule qa_disagreements:
        input:
            unpack(reads_inputs(READERS)),
        output:
            series=f"{WORK}/qa/adjudication.tsv",
            overlays=f"{WORK}/qa/adjudication_overlays.tsv",
            masks=directory(f"{WORK}/qa/adjudication_overlays"),
        params:
            results_dir=lambda wildcards, output: str(Path(output.series).parents[2]),
            baseline=BASELINE_ID,
            readers=" ".join(f"--reader {r}" for r in READERS),
            key_args=key_args,
        conda:
            "../../environment.yml"
        log:
            f"{RESULTS}/logs/qa_disagreements.log",
        shell:
            "khe-vol qa disagreements --results-dir {params.results_dir:q} {params.readers} --baseline-session {params.baseline} "
            "{params.key_args} --out {output.series:q} --overlays {output.overlays:q} --overlay-dir {output.masks:q} "
            "{input.records:q} > {log:q} 2>&1"


    rule qa_adjudication_package:
        input:
            series=f"{WORK}/qa/adjudication.tsv",
            overlays=f"{WORK}/qa/adjudication_overlays.tsv",
            overlay_masks=f"{WORK}/qa/adjudication_overlays",
            records=all_records(),
            masks=all_masks(),
        output:
            package=directory(reader_package(ADJUDICATOR or "none")),
            key=f"{BLINDING}/key_adjudication.tsv",
        params:
            results_dir=lambda wildcards, output: str(Path(output.key).parents[1]),
            adjudicator=ADJUDICATOR,
            seed=config["qa_seed"],
            display=DISPLAY_ARGS,
            reading_mode=config["reading_mode"],
        conda:
            "../../environment.yml"
        log:
            f"{RESULTS}/logs/qa_adjudication_package.log",
        shell:
            "khe-vol qa package --results-dir {params.results_dir:q} --reader {params.adjudicator} --seed {params.seed} {params.display} "
            "--reading-mode {params.reading_mode} --series {input.series:q} --overlays {input.overlays:q} --key {output.key:q} "
            "{input.records:q} > {log:q} 2>&1"


rule qa_audit:
    input:
        packages=qa_packages(),
        unblinding_keys=qa_keys(),
        # Reader comments are checked too: a new read means a new audit.
        dbs=existing_reads_dbs(READERS + ([ADJUDICATOR] if ADJUDICATOR else [])),
    output:
        f"{BLINDING}/audit.txt",
    params:
        results_dir=lambda wildcards, output: str(Path(output[0]).parents[1]),
        # Not an output: Snakemake deletes a failed rule's outputs, and these are the leaks to act on.
        findings=f"{BLINDING}/audit_findings.txt",
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/qa_audit.log",
    shell:
        # The arm and site names come from blinding/study_words.tsv (qa_package), as the reader app's do.
        "khe-vol qa audit --results-dir {params.results_dir:q} --findings {params.findings:q} > {output:q} 2> {log:q}"


rule qa_final:
    input:
        unpack(reads_inputs(READERS + ([ADJUDICATOR] if ADJUDICATOR else []), qa_keys())),
    output:
        records=f"{WORK}/qa/final_records.json",
        edited=directory(f"{WORK}/qa/edited"),
        agreement=f"{RESULTS}/qa_agreement.tsv",
        agreement_dictionary=f"{RESULTS}/qa_agreement.json",
    params:
        results_dir=lambda wildcards, output: str(Path(output.agreement).parent),
        baseline=BASELINE_ID,
        readers=" ".join(f"--reader {r}" for r in READERS),
        adjudicator=f"--adjudicator {ADJUDICATOR}" if ADJUDICATOR else "",
        key_args=key_args,
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/qa_final.log",
    shell:
        "khe-vol qa final --results-dir {params.results_dir:q} {params.readers} {params.adjudicator} "
        "--baseline-session {params.baseline} {params.key_args} --out {output.records:q} "
        "--edited-dir {output.edited:q} --agreement {output.agreement:q} {input.records:q} > {log:q} 2>&1"


rule qa_reader_times:
    """Per reader: time per read and share accepted without edit (kept from the readers; never served)."""
    input:
        # Written by `khe-vol qa serve`, never by the workflow: a new read makes them newer.
        dbs=existing_reads_dbs(READERS + ([ADJUDICATOR] if ADJUDICATOR else [])),
    output:
        table=f"{RESULTS}/qa_reader_times.tsv",
        dictionary=f"{RESULTS}/qa_reader_times.json",
    params:
        results_dir=lambda wildcards, output: str(Path(output.table).parent),
        readers=" ".join(f"--reader {r}" for r in READERS + ([ADJUDICATOR] if ADJUDICATOR else [])),
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/qa_reader_times.log",
    shell:
        "khe-vol qa reader-times --results-dir {params.results_dir:q} {params.readers} --out {output.table:q} "
        "> {log:q} 2>&1"
