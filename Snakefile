# khe-vol: from a BIDS-like folder of T2 series to lesion masks, volumes and
# response categories. Run from the repository root:
#     snakemake --cores 2 --configfile config/config.yaml     (the demo cohort)
#     snakemake --cores 8 --configfile my_study.yaml          (a study)
# There is deliberately no `configfile:` here: a study's config must not
# inherit the demo's, so a run without --configfile stops and says so
# (workflow/rules/common.smk, khe_vol/config.py).
# This is the main file (not a thin include), so `rule all` stays the default target.

from snakemake.utils import min_version

min_version("9.0")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


rule all:
    default_target: True
    input:
        final_outputs(),


# Stages, in the order data flows.
include: "workflow/rules/check.smk"
include: "workflow/rules/measure.smk"


if READERS:

    include: "workflow/rules/qa.smk"


include: "workflow/rules/tables.smk"
include: "workflow/rules/derivatives.smk"


if config["dicom_export"]:

    include: "workflow/rules/dicom.smk"


if config["allocation"]:

    include: "workflow/rules/analysis.smk"


include: "workflow/rules/report.smk"


# Another run writing the same results_dir (from another working directory,
# where Snakemake's own lock does not reach) is refused (khe_vol/runlock.py).
onstart:
    hold_results_lock()


onsuccess:
    release_results_lock()
    print(results_banner())


onerror:
    release_results_lock()
