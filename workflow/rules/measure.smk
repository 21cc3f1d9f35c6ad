# Stage 2: one job per series: validate, segment from the seed (or track from
# the reference session, or take the reader's mask), measure the volume.


rule measure_series:
    input:
        unpack(series_inputs),
    output:
        record=record_path("{participant}", "{session}"),
        mask=mask_path("{participant}", "{session}"),
    params:
        args=series_args,
    message:
        "measuring {wildcards.participant} {wildcards.session}"
    conda:
        "../../environment.yml"
    log:
        f"{RESULTS}/logs/measure_series/{{participant}}_{{session}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/measure_series/{{participant}}_{{session}}.tsv"
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    shell:
        "khe-vol series {params.args} --threads {threads} --record {output.record:q} --mask {output.mask:q} > {log:q} 2>&1"
