"""khe_vol.files: atomic writes, the one TSV format, records and mask paths."""

from __future__ import annotations

import json

import numpy as np
import pytest

from khe_vol.files import (
    NA,
    atomic_write_text,
    mask_beside,
    read_records,
    read_text_table,
    read_tsv,
    read_tsv_table,
    replacing_dir,
    series_mask_path,
    series_record_path,
    tsv_text,
    write_tsv,
)
from khe_vol.overlap import dice


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one\n")
    atomic_write_text(target, "two\n")
    assert target.read_text() == "two\n"
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]


def test_replacing_dir_swaps_whole_folder_and_keeps_the_old_one_on_error(tmp_path):
    out = tmp_path / "derivatives"
    with replacing_dir(out) as tmp:
        (tmp / "x.txt").write_text("first")
    assert sorted(p.name for p in out.iterdir()) == ["x.txt"]
    with pytest.raises(RuntimeError):
        with replacing_dir(out) as tmp:
            (tmp / "y.txt").write_text("half")
            raise RuntimeError("crash while building")
    # The crash left the previous folder whole and no temporary folder behind.
    assert sorted(p.name for p in out.iterdir()) == ["x.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["derivatives"]
    with replacing_dir(out) as tmp:
        (tmp / "z.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["z.txt"]  # replaced as a whole, not merged


def test_tsv_cells_never_break_the_table(tmp_path):
    rows = [{"a": "x\ty", "b": "line one\n  line two ", "c": None},
            {"a": "", "b": "two  spaces"}]
    text = tsv_text(["a", "b", "c"], rows)
    assert text == "a\tb\tc\nx y\tline one line two\tn/a\nn/a\ttwo spaces\tn/a\n"
    # Paths and ids that must read back exactly keep their spaces; only tabs and breaks go.
    kept = tsv_text(["a", "b"], rows, keep_spaces=True)
    assert kept.splitlines()[2] == "n/a\ttwo  spaces"
    write_tsv(tmp_path / "t.tsv", ["a", "b", "c"], rows)
    assert read_tsv(tmp_path / "t.tsv") == [{"a": "x y", "b": "line one line two", "c": NA},
                                           {"a": NA, "b": "two spaces", "c": NA}]
    assert read_tsv_table(tmp_path / "t.tsv") == (["a", "b", "c"], [["x y", "line one line two", NA],
                                                                       [NA, "two spaces", NA]])


def test_read_tsv_takes_a_byte_order_mark_and_no_quoting(tmp_path):
    path = tmp_path / "bom.tsv"
    path.write_bytes(b"\xef\xbb\xbfparticipant_id\tnote\nsub-01\t\"quoted\"\n")
    assert read_tsv(path) == [{"participant_id": "sub-01", "note": '"quoted"'}]


def test_read_tsv_table_names_file_and_line_of_a_ragged_row(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("a\tb\n1\t2\n3\n")
    with pytest.raises(ValueError, match=r"bad\.tsv, line 3: 1 fields, header has 2"):
        read_tsv_table(path)
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(ValueError, match="empty.tsv: empty file"):
        read_tsv_table(tmp_path / "empty.tsv")


def test_read_text_table_decodes_a_spreadsheets_utf16(tmp_path):
    path = tmp_path / "seeds.tsv"
    path.write_bytes("participant_id\tx\nsub-01\t1.5\n".encode("utf-16"))
    assert read_text_table(path, "seeds table") == "participant_id\tx\nsub-01\t1.5\n"
    path.write_bytes("participant_id\tx\n".encode("utf-16-le"))  # no byte-order mark: refused
    with pytest.raises(ValueError, match="seeds.tsv: seeds table is not UTF-8 text"):
        read_text_table(path, "seeds table")


def test_series_paths_and_records(tmp_path):
    record = series_record_path("results/work", "sub-01", "ses-m06")
    assert record == "results/work/series/sub-01/ses-m06/record.json"
    assert series_mask_path("results/work", "sub-01", "ses-m06") == "results/work/series/sub-01/ses-m06/mask.nii.gz"
    assert mask_beside(record).as_posix() == series_mask_path("results/work", "sub-01", "ses-m06")
    (tmp_path / "one.json").write_text(json.dumps({"participant_id": "sub-01"}))
    (tmp_path / "list.json").write_text(json.dumps([{"participant_id": "sub-02"}, {"participant_id": "sub-03"}]))
    assert [r["participant_id"] for r in read_records([tmp_path / "one.json", tmp_path / "list.json"])] == [
        "sub-01", "sub-02", "sub-03"]


def test_dice_counts_voxels_and_refuses_two_empty_masks():
    a = np.zeros((6, 6, 3), bool)
    b = np.zeros((6, 6, 3), bool)
    a[1:4, 1:4, 1] = True  # 9 voxels
    b[2:5, 1:4, 1] = True  # 9 voxels, 6 shared
    assert dice(a, b) == pytest.approx(2 * 6 / 18)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    with pytest.raises(ValueError, match="two empty masks"):
        dice(np.zeros_like(a), np.zeros_like(a))
    with pytest.raises(ValueError, match="not on one grid"):
        dice(a, a[:, :, :2])
