"""QC montages: orientation from the affine (radiological), slice positions in mm, words per copy."""

from __future__ import annotations

import io
import struct
import zlib

import matplotlib.image as mpimg
import numpy as np
import pytest

from khe_vol.report.montage import (
    LEGEND,
    montage_png,
    montage_tiles,
    qc_montage_png,
    record_montage_text,
    slice_position,
)

SHAPE = (40, 50, 10)
ZOOMS = (0.8, 0.8, 4.0)


def scene():
    """Image and mask of a bright block at the patient's right, anterior; affine RAS+ identity-like."""
    affine = np.diag([*ZOOMS, 1.0])
    affine[:3, 3] = [-16.0, -20.0, -18.0]
    data = np.full(SHAPE, 100.0, np.float32)
    data[28:36, 34:44, 3:7] = 900.0  # x index high = patient's right (+x); y high = anterior
    mask = data > 500
    return data, affine, mask


def restored(data, affine, flips=(), order=(0, 1, 2)):
    """The same physical image stored with flipped and permuted array axes."""
    data, affine = data.copy(), affine.copy()
    for axis in flips:
        data = np.flip(data, axis)
        shift = np.eye(4)
        shift[axis, axis], shift[axis, 3] = -1, data.shape[axis] - 1
        affine = affine @ shift
    perm = np.eye(4)[list(order) + [3]].T
    return np.transpose(data, order), affine @ perm


def png_chunks(payload):
    out, pos = [], 8
    while pos < len(payload):
        length, kind = struct.unpack(">I4s", payload[pos:pos + 8])
        out.append(kind)
        pos += 12 + length
    return out


@pytest.mark.parametrize("flips, order", [((), (0, 1, 2)), ((0,), (0, 1, 2)), ((0, 1), (1, 0, 2)),
                                          ((2,), (2, 0, 1))])
def test_tiles_are_the_same_physical_view_however_the_array_is_stored(flips, order):
    data, affine, mask = scene()
    reference = montage_tiles(data, affine, mask)
    tiles = montage_tiles(*restored(data, affine, flips, order), restored(mask, affine, flips, order)[0])
    assert tiles.positions == reference.positions
    assert tiles.letters == reference.letters
    for a, b in zip(tiles.images, reference.images):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(tiles.masks, reference.masks):
        np.testing.assert_array_equal(a, b)


def test_radiological_letters_and_the_lesion_on_screen_left_and_up():
    data, affine, mask = scene()
    tiles = montage_tiles(data, affine, mask)
    # Axial slices: patient's right on screen left, anterior up.
    assert all(letters == {"left": "R", "right": "L", "top": "A", "bottom": "P"} for letters in tiles.letters)
    for m in tiles.masks:
        rows, cols = np.nonzero(m)
        assert cols.max() < m.shape[1] / 2  # the right-sided lesion is on screen left
        assert rows.max() < m.shape[0] / 2  # the anterior lesion is up
    assert "patient's right on screen left" in LEGEND


def test_slice_positions_are_ras_mm_of_the_slice_centre():
    data, affine, mask = scene()
    tiles = montage_tiles(data, affine, mask)
    # Lesion slices 3..6 along z: centres at -18 + 4 k mm.
    assert tiles.positions == ["axial I 6.0 mm", "axial I 2.0 mm", "axial S 2.0 mm", "axial S 6.0 mm"]
    assert slice_position(affine, SHAPE, 2, 5) == ("axial", 2, 2.0)
    # A sagittal acquisition (thick slices along x), tilted 20 degrees: said so.
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    tilted = np.diag([4.0, 0.8, 0.8, 1.0])
    tilted[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ tilted[:3, :3]
    plane, axis, _ = slice_position(tilted, SHAPE, 0, 2)
    assert (plane, axis) == ("oblique sagittal", 0)


def test_png_has_no_text_chunk_is_reproducible_and_carries_its_title():
    data, affine, mask = scene()
    plain = qc_montage_png(data, affine, mask)
    titled = qc_montage_png(data, affine, mask, "case K7QX2M4P9A", ["automatic volume 1.23 mL", "review: none"])
    assert titled == qc_montage_png(data, affine, mask, "case K7QX2M4P9A",
                                    ["automatic volume 1.23 mL", "review: none"])
    assert titled != plain
    assert not {b"tEXt", b"iTXt", b"zTXt"} & set(png_chunks(titled))
    pixels = mpimg.imread(io.BytesIO(titled), format="png")
    # The title band above the tiles has white text on black.
    assert pixels[:20].max() > 0.9
    assert zlib.crc32(titled) == zlib.crc32(montage_png(montage_tiles(data, affine, mask), "case K7QX2M4P9A",
                                                        ["automatic volume 1.23 mL", "review: none"]))


def test_report_copy_names_participant_session_volume_status_and_flags():
    record = {"participant_id": "sub-07", "session_id": "ses-m06", "month": 6, "status": "ok", "method": "auto",
              "volume_ml": 12.3456, "volume_low_ml": 8.0, "volume_high_ml": 18.0, "qa_status": "pending",
              "review": [{"reason": "near_threshold", "detail": "x"}], "affine": np.eye(4).tolist(),
              "message": None}
    title, lines = record_montage_text(record)
    assert title == "sub-07 ses-m06 (month 6)"
    assert lines == ["volume 12.35 mL (band 8.00-18.00 mL); method auto", "status ok, qa_status pending",
                     "review: near_threshold; wide_band"]
    error = dict(record, status="error", message="no seed for this baseline", review=[])
    assert record_montage_text(error)[1] == ["status error, qa_status pending: no seed for this baseline",
                                             "review: none"]


def test_words_with_dollar_signs_are_drawn_as_text():
    """A message or file name with two "$" must not be parsed as mathtext (an error would stop the job)."""
    data, affine, mask = scene()
    payload = qc_montage_png(data, affine, mask, "sub-01 ses-m06", ["status error: /data/$x^{bad$/T2w.nii.gz"])
    assert payload.startswith(b"\x89PNG")
