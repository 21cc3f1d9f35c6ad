"""The per-series record: what one series job found, as typed fields.

A record is written as ``record.json`` beside ``mask.nii.gz``
(:func:`khe_vol.files.series_record_path`) and read back by the tables, the
reader packages, the reads and the derivatives. It stays a plain dict on disk
and in memory (JSON in, JSON out, byte for byte); :class:`SeriesRecord` names
every key with its type and unit so that type checkers and readers of the code
know what a ``record["..."]`` holds.
"""

from __future__ import annotations

from typing import Any, TypedDict


class ReviewItem(TypedDict):
    """One reason a value may be wrong (:mod:`khe_vol.review`)."""

    reason: str
    detail: str


class SeriesRecord(TypedDict):
    """Outcome of one series (``status`` ``ok`` or ``error``).

    Volumes are in mL, lengths in mm or cm as named, coordinates scanner RAS+ mm.
    After reader QA (:mod:`khe_vol.qa.reads`) a final record also carries
    ``volume_auto_ml``, ``volume_source`` and ``qa_status``.
    """

    participant_id: str
    session_id: str
    month: int | None
    status: str
    message: str | None
    method: str | None
    n_voxels: int | None
    voxel_volume_mm3: float | None
    volume_ml: float | None
    volume_low_ml: float | None
    volume_high_ml: float | None
    mesh_volume_ml: float | None
    max_diameter_cm: float | None
    source_file: str | None
    source_sha256: str | None
    affine_source: str | None
    shape: list[int] | None
    affine: list[list[float]] | None
    seed_ras_mm: list[float] | None
    seed_source: str | None  # "seeds_file", "reader" (a reader's first include click) or None
    needs_seed: bool  # a baseline waiting for a reader's seed (no seed, no mask, nothing to track from)
    reference_needs_seed: bool  # not tracked: its reference session waits for a seed
    reader_mask_file: str | None
    reader_mask_sha256: str | None
    reference_session_id: str | None
    parameters: dict[str, Any] | None
    details: dict[str, Any] | None
    review: list[ReviewItem]
    khe_vol_version: str
