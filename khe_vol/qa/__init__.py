"""Blinded reading: the reader package, its leak audit, the reads store and the reader app.

Storage layout under a results directory ``R``:

``R/qa/<reader>/``
    What one reader may see, and nothing else: ``worklist.json`` and, per
    case, files named only by the case code (``<code>_t2.nii.gz``,
    ``<code>_mask.nii.gz``, ``<code>_qc.png``, adjudication overlays
    ``<code>_reader-a_mask.nii.gz``, ...). Built by ``khe-vol qa package``.
``R/blinding/key.tsv`` (+ ``key.json`` data dictionary)
    The unblinding key: case code -> participant and session. Never under
    ``qa/``; the app never reads it.
``R/reads/<reader>.sqlite``
    The reader's verdicts, append-only. Not a workflow output, so a rerun
    of the workflow never deletes reads.
"""

from __future__ import annotations

from pathlib import Path

#: Verdicts a reader can give a case.
VERDICTS = ("accept", "edited", "reject", "no_residual_lesion")

#: Human wording of each verdict (buttons, history).
VERDICT_LABELS = {
    "accept": "Accept",
    "edited": "Edited",
    "reject": "Reject (unmeasurable)",
    "no_residual_lesion": "No residual lesion",
}

#: ``qa_status`` values of volumes.tsv: where a series stands in blinded reading.
#: Here, not in :mod:`khe_vol.qa.reads`, so the tables can document them without
#: loading the reads machinery.
QA_STATUSES = {
    "not_configured": "no reader QA in this run: the automatic (or supplied) mask's volume",
    "pending_seed": "no seed in the seeds table: waiting for a reader to seed the baseline in the reader app (click "
    "inside the lesion); a follow-up is tracked, and shown to a reader, once that reader has seeded its baseline: "
    "no final volume",
    "pending_read": "not yet read by every reader (or a read is stale): no final volume",
    "pending_adjudication": "readers disagree; waiting for the adjudicator: no final volume",
    "accepted": "readers accepted the automatic mask",
    "edited": "the deciding reader corrected the mask",
    "no_residual_lesion": "the deciding reader found no residual lesion: 0 mL",
    "rejected": "the deciding reader rejected the series as unmeasurable: excluded",
    "no_case": "the series could not be shown to readers (see message)",
}

#: How readers see the cases (config ``reading_mode``): ``independent``, one scan at a time in a
#: shuffled order; ``longitudinal``, a participant's scans grouped as T1..Tn in time order under a
#: blinded participant code, each follow-up beside T1 (see :func:`khe_vol.qa.package.build_worklist`).
READING_MODES = ("independent", "longitudinal")

#: waitress worker threads of ``khe-vol qa serve`` by default. A request is Python, run one at a time
#: under the GIL (SQLite, zlib and fsync release it), so a few threads keep 2 cores busy and more only
#: contend: 20 readers saving back to back on 2 cores gave p95 219 / 264 / 325 ms with 2 / 4 / 8 threads
#: (benchmarks/reading_service.py). 4, not 2, so that two slow requests (a click segmentation, an
#: upload) never hold up every other reader's save; requests beyond them wait in waitress's queue.
SERVE_THREADS = 4

WORKLIST_NAME = "worklist.json"

#: How the reader app shows images unless the study config's ``reader_display`` says otherwise:
#: radiological convention (the patient's left on the screen's right), as radiologists read.
DEFAULT_READER_DISPLAY = {"radiological": True}

#: Longest reader comment, characters; a longer one is refused (never cut without a word).
COMMENT_MAX_CHARS = 5000

#: Columns of the adjudication list (``khe-vol qa disagreements --out``).
ADJUDICATION_COLUMNS = ("participant_id", "session_id", "reason")
#: Columns of an overlays TSV (``qa disagreements --overlays``, ``qa package --overlays``):
#: one row per other reader's read of a series.
OVERLAY_COLUMNS = ("participant_id", "session_id", "reader", "verdict", "volume_ml", "mask")


def reader_dir(results_dir, reader):
    """``R/qa/<reader>``: the only folder a reader's app serves from."""
    return Path(results_dir) / "qa" / reader


def key_dir(results_dir):
    """``R/blinding``: the unblinding key, outside ``qa/``."""
    return Path(results_dir) / "blinding"


def default_db_path(results_dir, reader):
    """``R/reads/<reader>.sqlite``: where a reader's verdicts are kept."""
    return Path(results_dir) / "reads" / f"{reader}.sqlite"


def check_reader_id(reader):
    """Refuse reader ids that could not be a single, plain path component."""
    if not reader or not reader.replace("-", "").replace("_", "").isalnum() or not reader.isascii():
        raise ValueError(f"reader id {reader!r} must be letters, digits, '-' or '_' only (e.g. R1, ADJ)")
    return reader
