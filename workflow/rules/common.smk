# Config validation, study discovery and the input functions of every rule.

import json
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError

from khe_vol.config import ConfigError, baseline_session, resolve_config
from khe_vol.discover import discover_study, study_missing_visits
from khe_vol.files import read_tsv, series_mask_path, series_record_path
from khe_vol.plan import SOURCE_NEEDS_SEED, SOURCE_READER_MASK, SOURCE_SEED, SOURCE_TRACKED, series_plan
from khe_vol.qa.seeding import seeded_baselines
from khe_vol.runlock import ResultsFolderBusy, lock_results_dir, release_results_dir
from khe_vol.summary import missing_line, review_line


# The config is resolved by khe-vol itself, as `khe-vol check` resolves it: only
# the --configfile files given (a later file's top-level keys replace, never
# merge, an earlier's) and --config values; a key left out takes the schema's
# default. Snakemake's own deep merge of the files is discarded.
try:
    _resolved = resolve_config(workflow.config_settings.configfiles, workflow.config_settings.config)
except ConfigError as exc:
    raise WorkflowError(f"khe-vol: {exc}")
config.clear()
config.update(_resolved)

RESULTS = config["results_dir"]
WORK = f"{RESULTS}/work"
BLINDING = f"{RESULTS}/blinding"
READERS = list(config["readers"])
ADJUDICATOR = config["adjudicator"]
# The reader app's left-right convention, kept in each reader's worklist.
DISPLAY_ARGS = "" if config["reader_display"].get("radiological", True) else "--neurological"
BASELINE_ID = f"ses-{baseline_session(config)}"

try:
    STUDY = discover_study(config)
except (FileNotFoundError, ValueError) as exc:
    raise WorkflowError(f"khe-vol: {exc}")
for _problem in STUDY.problems:
    logger.warning(f"khe-vol: {_problem}")
if not STUDY.slots:
    raise WorkflowError(
        f"khe-vol: no T2w series found under {config['imaging_dir']}" + "".join(f"\n  {p}" for p in STUDY.problems)
    )

SLOTS = {(s.participant_id, s.session_id): s for s in STUDY.slots}
# Expected visits with no series: a status=missing row each in the tables (khe-vol tables finds the same).
MISSING_VISITS = study_missing_visits(STUDY, config["sessions"])
# Reader mask beats seed beats tracking: decided once, by khe_vol.plan.
PLAN = series_plan(STUDY, BASELINE_ID)


wildcard_constraints:
    participant="sub-[A-Za-z0-9]+",
    session="ses-[A-Za-z0-9]+",


_RESULTS_LOCK = []


def hold_results_lock():
    """Lock results_dir for this Snakemake process (from onstart: real runs only, not in SLURM jobs)."""
    try:
        _RESULTS_LOCK.append(lock_results_dir(RESULTS))
    except (ResultsFolderBusy, OSError) as exc:
        raise WorkflowError(f"khe-vol: {exc}")


def release_results_lock():
    while _RESULTS_LOCK:
        release_results_dir(_RESULTS_LOCK.pop())


def record_path(participant, session):
    return series_record_path(WORK, participant, session)


def mask_path(participant, session):
    return series_mask_path(WORK, participant, session)


def all_records():
    return [record_path(*key) for key in SLOTS]


def all_masks():
    return [mask_path(*key) for key in SLOTS]


PARTICIPANTS = sorted({pid for pid, _ in SLOTS})


def participant_series(wildcards):
    """Records and masks of one participant's series, in session order."""
    keys = [key for key in SLOTS if key[0] == wildcards.participant]
    return {"records": [record_path(*k) for k in keys], "masks": [mask_path(*k) for k in keys]}


def montage_dir(participant):
    return f"{RESULTS}/figures/montages/{participant}"


def participant_page_path(participant, ext):
    """The unblinded page of one participant (HTML or PDF)."""
    return f"{RESULTS}/participants/{participant}.{ext}"


def _reference_paths(pid, plan, reader=None):
    """Record and mask a tracked series starts from: the cohort's, or a reader's seeded baseline."""
    if reader is not None:
        return reader_baseline_record(reader, pid), reader_baseline_mask(reader, pid)
    return record_path(pid, plan.reference_session_id), mask_path(pid, plan.reference_session_id)


def series_inputs(wildcards):
    """Image, reader mask and (for tracked follow-ups) the reference session's outputs."""
    pid, ses = wildcards.participant, wildcards.session
    slot, plan = SLOTS[(pid, ses)], PLAN[(pid, ses)]
    inputs = {}
    if slot.path is not None:
        inputs["image"] = str(slot.path)
    if plan.source == SOURCE_READER_MASK:
        inputs["reader_mask"] = str(plan.reader_mask)
    elif plan.source == SOURCE_TRACKED:
        inputs["reference_record"], inputs["reference_mask"] = _reference_paths(pid, plan, wildcards.get("reader"))
    return inputs


def series_args(wildcards):
    """Command-line arguments of `khe-vol series` for one slot, shell-quoted.

    With a ``reader`` wildcard: the follow-up tracked from that reader's seeded baseline.
    """
    pid, ses = wildcards.participant, wildcards.session
    slot, plan = SLOTS[(pid, ses)], PLAN[(pid, ses)]
    args = ["--participant", pid, "--session", ses, "--month", "n/a" if slot.month is None else str(slot.month)]
    if slot.path is not None:
        args += ["--image", str(slot.path)]
    if plan.problem:
        args += ["--problem", plan.problem]
    if plan.source == SOURCE_READER_MASK:
        args += ["--reader-mask", str(plan.reader_mask)]
    elif plan.source == SOURCE_SEED:
        args += ["--seed", *(repr(float(v)) for v in plan.seed_ras_mm)]
    elif plan.source == SOURCE_NEEDS_SEED:
        args += ["--needs-seed"]
    elif plan.source == SOURCE_TRACKED:
        ref_record, ref_mask = _reference_paths(pid, plan, wildcards.get("reader"))
        args += ["--reference-record", ref_record, "--reference-mask", ref_mask]
    if config["segmentation"]:
        args += ["--segmentation-json", json.dumps(config["segmentation"], sort_keys=True)]
    return shlex.join(args)


# Baselines with no seed that a reader has seeded in the reader app (the reads
# so far): that reader's follow-ups are tracked from that reader's own mask
# and go to that reader's worklist only (khe_vol/qa/seeding.py).
NEEDS_SEED = sorted(pid for (pid, ses), p in PLAN.items() if p.source == SOURCE_NEEDS_SEED)
SEEDED = {}
if READERS and NEEDS_SEED:
    _needs_seed_records = {}
    for _pid in NEEDS_SEED:
        try:
            _needs_seed_records[_pid] = json.loads(Path(record_path(_pid, BASELINE_ID)).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # not measured yet: nobody can have seeded it
    SEEDED, _seed_problems = seeded_baselines(RESULTS, READERS, config["qa_seed"], _needs_seed_records)
    for _problem in _seed_problems:
        logger.warning(f"khe-vol: {_problem}")


def reader_work(reader):
    return f"{WORK}/readers/{reader}"


def reader_baseline_record(reader, participant):
    return f"{reader_work(reader)}/baseline/{participant}/record.json"


def reader_baseline_mask(reader, participant):
    return f"{reader_work(reader)}/baseline/{participant}/mask.nii.gz"


def reader_series():
    """(reader, participant, session) of every follow-up tracked from a reader's seeded baseline."""
    return [(reader, pid, ses) for (reader, pid) in sorted(SEEDED) for (p, ses) in SLOTS
            if p == pid and ses != BASELINE_ID and PLAN[(p, ses)].source == SOURCE_TRACKED]


def reader_records():
    return [series_record_path(reader_work(r), pid, ses) for r, pid, ses in reader_series()]


def reader_record_args(wildcards, input):
    """`--reader-record R path` for each reader's own follow-up record (that reader's package only)."""
    out = []
    for (reader, pid, ses), path in zip(reader_series(), reader_records()):
        out += ["--reader-record", reader, path]
    return shlex.join(out)


def reader_package(reader):
    """A reader's folder: everything that reader sees, and nothing else."""
    return f"{RESULTS}/qa/{reader}"


def qa_packages():
    return [reader_package(r) for r in READERS + ([ADJUDICATOR] if ADJUDICATOR else [])]


def qa_keys():
    return [f"{BLINDING}/key.tsv"] + ([f"{BLINDING}/key_adjudication.tsv"] if ADJUDICATOR else [])


def existing_reads_dbs(readers):
    """Reads databases written so far by `khe-vol qa serve` (never by the workflow)."""
    dbs = [f"{RESULTS}/reads/{r}.sqlite" for r in readers]
    return [db for db in dbs if Path(db).is_file()]


def reads_inputs(readers, keys=None):
    """Input function: records, unblinding keys and the reads databases that exist so far.

    The databases are written by `khe-vol qa serve`, never by the workflow, so
    a rerun never deletes a read; a new read makes its database newer than
    what was built from it, and the affected steps run again.
    """

    def inputs(wildcards):
        return {
            "records": all_records(),
            "unblinding_keys": keys or [f"{BLINDING}/key.tsv"],
            "dbs": existing_reads_dbs(readers),
        }

    return inputs


def key_args(wildcards, input):
    return " ".join(f"--key {shlex.quote(k)}" for k in input.unblinding_keys)


def table_records():
    """Records the tables are made from: the reads' final records when readers are set."""
    return [f"{WORK}/qa/final_records.json"] if READERS else all_records()


def provenance_outputs():
    """Results whose checksums provenance.json records: the data, not the JSON metadata beside it."""
    return [p for p in result_files() if not p.endswith(".json")]


def workbook_tables():
    """The tables the workbook holds, in reading order."""
    tables = ["volumes.tsv", "response.tsv"]
    if config["allocation"]:
        tables.append("response_by_arm.tsv")
    if READERS:
        tables.append("qa_agreement.tsv")
    return [f"{RESULTS}/{name}" for name in tables + ["check.tsv"]]


def report_pages():
    """The tables as HTML pages for the report, and the summaries its front page includes."""
    names = ["response_table", "response_summary"]
    if config["allocation"]:
        names += ["response_by_arm", "response_by_arm_summary"]
    return [f"{RESULTS}/figures/{name}.html" for name in names]


def final_outputs():
    montages = [montage_dir(pid) for pid in PARTICIPANTS]
    pages = [participant_page_path(pid, ext) for pid in PARTICIPANTS for ext in ("html", "pdf")]
    reports = [f"{RESULTS}/figures/waterfall.png", *montages, *pages, f"{RESULTS}/khe_vol_results.xlsx",
               *report_pages()]
    return result_files() + reports + [f"{RESULTS}/provenance.json"]


def result_files():
    qa = [f"{BLINDING}/audit.txt", f"{RESULTS}/qa_agreement.tsv", f"{RESULTS}/qa_reader_times.tsv"] if READERS else []
    arms = [f"{RESULTS}/response_by_arm.tsv", f"{RESULTS}/response_by_arm.json"] if config["allocation"] else []
    dicom = [f"{RESULTS}/dicom"] if config["dicom_export"] else []
    return qa + arms + dicom + [
        f"{RESULTS}/check.tsv",
        f"{RESULTS}/check.json",
        f"{RESULTS}/volumes.tsv",
        f"{RESULTS}/volumes.json",
        f"{RESULTS}/response.tsv",
        f"{RESULTS}/response.json",
        f"{RESULTS}/derivatives",
    ]


def results_banner():
    # Counted from the records the tables are made from, so the banner and volumes.tsv agree.
    counts = {}
    paths = table_records()
    if not all(Path(p).is_file() for p in paths):
        paths = all_records()  # the reads were not imported (a failed run): the automatic records
    for path in paths:
        try:
            loaded = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        for rec in loaded if isinstance(loaded, list) else [loaded]:
            status = rec.get("status") if rec.get("status") in ("ok", "pending", "excluded") else "error"
            counts[status] = counts.get(status, 0) + 1
    n_err = counts.get("error", 0)
    waiting = "".join(f", {counts[s]} {what}" for s, what in (("pending", "waiting for readers"),
                                                                ("excluded", "excluded by readers")) if counts.get(s))
    try:
        n_problems = sum(row.get("severity", "problem") == "problem" for row in read_tsv(f"{RESULTS}/check.tsv"))
    except OSError:
        n_problems = 0
    n_missing = len(MISSING_VISITS)
    missing = f", {n_missing} expected visit(s) missing" if n_missing else ""
    lines = [
        f"\nkhe-vol: {len(SLOTS)} series, {n_err} with errors{waiting}{missing}. Results in {RESULTS}/:",
        "  volumes.tsv, response.tsv (+ .json data dictionaries), khe_vol_results.xlsx, check.tsv,",
        "  derivatives/ (lesion masks), figures/, participants/ (a page per participant: names them, unblinded),",
        "  provenance.json, logs/",
    ]
    if config["allocation"]:
        lines.append("  response_by_arm.tsv (intention to treat)")
    if config["dicom_export"]:
        lines.append("  dicom/: DICOM SEG + SR per imported series for the site's PACS (export.tsv lists each)")
    if READERS:
        lines.append(f"  qa/<reader>/ for blinded readers: khe-vol qa add-reader {READERS[0]} --results-dir {RESULTS}, "
                     f"then khe-vol qa serve --results-dir {RESULTS}")
        lines.append("  qa_agreement.tsv; the unblinding key is in blinding/ (keep it from readers)")
    if n_problems:
        lines.append(
            f"  check.tsv: {n_problems} problem(s) with the inputs (files not read such as DICOM, unknown "
            "sessions, allocation mismatches, ...): read it"
        )
    tables = [Path(f"{RESULTS}/{name}.tsv") for name in ("volumes", "response")]
    try:
        lines.append(review_line(*(read_tsv(t) for t in tables)))
    except (OSError, ValueError):
        pass  # a run that made no tables (a target before them): nothing to count
    if missing_line(MISSING_VISITS):
        lines.append(missing_line(MISSING_VISITS))
    lines.append("  HTML report: add --report report.html to this command")
    return "\n".join(lines) + "\n"
