"""Where each series' lesion comes from: the one place that decides.

A reader's mask beats a seed, and a seed beats tracking from the participant's
reference session. A baseline with none of these *needs a seed*: with readers
set, each reader seeds it in the reader app, and its follow-ups are tracked
from that reader's own seeded baseline (:mod:`khe_vol.qa.seeding`). The workflow's rules (``common.smk``), ``khe-vol check``
and the per-series job all follow :func:`series_plan`, so they can never
disagree on how a series is measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from khe_vol.discover import Study, reference_session

#: How a series' lesion mask is made.
SOURCE_READER_MASK = "reader_mask"
SOURCE_SEED = "seed"
SOURCE_TRACKED = "tracked"
SOURCE_NEEDS_SEED = "needs_seed"
SOURCE_NONE = "none"


@dataclass(frozen=True)
class SeriesPlan:
    """How one series is measured.

    Attributes
    ----------
    participant_id, session_id : str
    source : str
        ``reader_mask``, ``seed``, ``tracked``, ``needs_seed`` (a baseline
        with no seed, no reader mask and no other session to track from: it
        waits for a reader's seed, and the participant's other sessions are
        tracked from it once seeded) or ``none`` (nothing to segment from:
        the series job reports it).
    reader_mask : Path or None
        The reader's mask file (``source == "reader_mask"``).
    seed_ras_mm : tuple of float or None
        The seed, scanner RAS+ mm (``source == "seed"``).
    reference_session_id : str or None
        The session tracked from (``source == "tracked"``).
    problem : str or None
        Why the series cannot be measured at all (from discovery), or None.
    """

    participant_id: str
    session_id: str
    source: str
    reader_mask: Path | None = None
    seed_ras_mm: tuple[float, float, float] | None = None
    reference_session_id: str | None = None
    problem: str | None = None


def series_plan(study: Study, baseline_session_id: str) -> dict[tuple[str, str], SeriesPlan]:
    """Decide, for every series of a study, where its lesion mask comes from.

    Parameters
    ----------
    study : khe_vol.discover.Study
    baseline_session_id : str
        ``ses-<label>`` of the month-0 session.

    Returns
    -------
    dict
        ``(participant_id, session_id)`` -> :class:`SeriesPlan`, one per slot.
    """
    slots = {(s.participant_id, s.session_id): s for s in study.slots}
    references = {pid: reference_session(study, pid, baseline_session_id) for pid, _ in slots}
    # Nothing to segment from anywhere, but a baseline a reader can seed.
    needs_seed = {pid for pid, ref in references.items() if ref is None and (pid, baseline_session_id) in slots}
    plans = {}
    for key, slot in slots.items():
        pid, ses = key
        common = {"participant_id": pid, "session_id": ses,
                  "problem": slot.problem or study.seed_problems.get(pid)}
        ref = references[pid]
        if key in study.masks:
            plans[key] = SeriesPlan(source=SOURCE_READER_MASK, reader_mask=study.masks[key], **common)
        elif key in study.seeds:
            plans[key] = SeriesPlan(source=SOURCE_SEED, seed_ras_mm=study.seeds[key].seed_ras_mm, **common)
        elif ref is not None and ref != ses and (pid, ref) in slots:
            plans[key] = SeriesPlan(source=SOURCE_TRACKED, reference_session_id=ref, **common)
        elif pid in needs_seed and ses == baseline_session_id:
            plans[key] = SeriesPlan(source=SOURCE_NEEDS_SEED, **common)
        elif pid in needs_seed:
            # Tracked once the baseline has a seed; until then the job says it waits.
            plans[key] = SeriesPlan(source=SOURCE_TRACKED, reference_session_id=baseline_session_id, **common)
        else:
            plans[key] = SeriesPlan(source=SOURCE_NONE, **common)
    return plans
