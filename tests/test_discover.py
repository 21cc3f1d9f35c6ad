import pytest

from khe_vol.config import ConfigError, load_config, resolve_config, validate_config
from khe_vol.discover import discover_study, find_series, read_seeds, reference_session
from tests.conftest import save_nifti

import numpy as np

SESSIONS = {"baseline": 0, "m06": 6, "m12": 12}


def _t2(root, sub, ses, extra=""):
    name = f"sub-{sub}_ses-{ses}{extra}_T2w.nii.gz"
    return save_nifti(root / f"sub-{sub}" / f"ses-{ses}" / "anat" / name, np.ones((4, 4, 4), np.float32), np.eye(4))


def test_finds_series_sorted_by_month(tmp_path):
    for ses in ("m12", "baseline", "m06"):
        _t2(tmp_path, "01", ses)
    _t2(tmp_path, "02", "baseline", "_acq-ax_run-1")
    slots, problems = find_series(tmp_path, SESSIONS)
    assert problems == []
    assert [(s.participant_id, s.session_id, s.month) for s in slots] == [
        ("sub-01", "ses-baseline", 0), ("sub-01", "ses-m06", 6), ("sub-01", "ses-m12", 12), ("sub-02", "ses-baseline", 0)]
    assert all(s.problem is None for s in slots)


def test_two_t2w_in_a_session_is_an_error_naming_both(tmp_path):
    a = _t2(tmp_path, "01", "baseline", "_acq-ax")
    b = _t2(tmp_path, "01", "baseline", "_acq-cor")
    slots, _ = find_series(tmp_path, SESSIONS)
    (slot,) = slots
    assert slot.path is None
    assert str(a) in slot.problem and str(b) in slot.problem
    slots, _ = find_series(tmp_path, SESSIONS, series_select={"acq": "cor"})
    assert slots[0].path == b and slots[0].problem is None


def test_unknown_session_reported_not_guessed(tmp_path):
    _t2(tmp_path, "01", "baseline")
    _t2(tmp_path, "01", "m03")
    slots, _ = find_series(tmp_path, SESSIONS)
    odd = [s for s in slots if s.session_id == "ses-m03"][0]
    assert odd.month is None and "ses-m03" in odd.problem and "not in the config sessions" in odd.problem


def test_misnamed_and_misplaced_files_are_problems(tmp_path):
    _t2(tmp_path, "01", "baseline")
    bad = save_nifti(tmp_path / "sub-01/ses-m06/anat/sub-01_ses-m06_acq_T2w.nii.gz", np.ones((2, 2, 2)), np.eye(4))
    moved = save_nifti(tmp_path / "sub-01/ses-m06/anat/sub-02_ses-m06_T2w.nii.gz", np.ones((2, 2, 2)), np.eye(4))
    save_nifti(tmp_path / "sub-01/ses-m06/anat/sub-01_ses-m06_T1w.nii.gz", np.ones((2, 2, 2)), np.eye(4))
    slots, problems = find_series(tmp_path, SESSIONS)
    assert len(slots) == 1
    assert any(str(bad) in p for p in problems) and any(str(moved) in p for p in problems)
    assert len(problems) == 2  # the T1w is simply not ours


def write_dicom(path):
    """A file as a scanner exports it: 128-byte preamble, 'DICM', then data elements."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\xc8\x00\x00\x00" + b"\x01" * 200)
    return path


def test_dicom_in_the_imaging_folder_is_reported_with_what_to_do(tmp_path):
    _t2(tmp_path, "01", "baseline")
    # a DICOM series folder (files without extension, found by content) and a .dcm beside a NIfTI
    for i in range(3):
        write_dicom(tmp_path / f"sub-02/ses-baseline/DICOM/IM{i:04d}")
    write_dicom(tmp_path / "sub-01/ses-m06/anat/export.dcm")
    (tmp_path / "sub-01/ses-m06/anat/notes.txt").write_text("not an image\n" * 20)
    (tmp_path / "README").write_bytes(b"x" * 300)  # not DICOM: no 'DICM' at byte 128
    slots, problems = find_series(tmp_path, SESSIONS)
    assert [(s.participant_id, s.session_id) for s in slots] == [("sub-01", "ses-baseline")]
    assert len(problems) == 2, problems
    series_dir = next(p for p in problems if str(tmp_path / "sub-02/ses-baseline/DICOM") in p)
    assert "3 DICOM files" in series_dir and "IM0000" in series_dir
    assert "NIfTI" in series_dir and "dcm2niix" in series_dir and "khe-vol import" in series_dir
    assert any(str(tmp_path / "sub-01/ses-m06/anat") in p and "1 DICOM file " in p for p in problems)


def test_a_folder_of_dicom_only_says_so_when_no_series_is_found(tmp_path):
    write_dicom(tmp_path / "sub-01/ses-baseline/anat/IM0001")
    config = validate_config({"imaging_dir": str(tmp_path), "sessions": SESSIONS})
    study = discover_study(config)
    assert study.slots == [] and any("DICOM" in p and "dcm2niix" in p for p in study.problems)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_series(tmp_path / "nope", SESSIONS)


def test_seeds_table(tmp_path):
    p = tmp_path / "seeds.tsv"
    p.write_text("participant_id\tx\ty\tz\tsession_id\nsub-01\t1.5\t-2\t3\t\n02\t4\t5\t6\tm06\nsub-03\tabc\t1\t2\tn/a\n")
    seeds, problems = read_seeds(p, "baseline")
    assert seeds[("sub-01", "ses-baseline")].seed_ras_mm == (1.5, -2.0, 3.0)
    assert seeds[("sub-02", "ses-m06")].seed_ras_mm == (4.0, 5.0, 6.0)
    assert "sub-03" in problems and "line 4" in problems["sub-03"]
    q = tmp_path / "bad.tsv"
    q.write_text("participant_id\tx\ty\nsub-01\t1\t2\n")
    with pytest.raises(ValueError, match="lacks column"):
        read_seeds(q, "baseline")


SEEDS_TEXT = "participant_id\tx\ty\tz\nsub-01\t1.5\t-2\t3\nsub-02\t4\t5\t6\n"


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be"])
def test_seeds_saved_by_a_spreadsheet_with_a_byte_order_mark(tmp_path, encoding):
    # Excel's "UTF-8" text carries a BOM; its "Unicode Text" is UTF-16 with a BOM and CRLF line ends.
    p = tmp_path / "seeds.tsv"
    text = SEEDS_TEXT.replace("\n", "\r\n") if encoding.startswith("utf-16") else SEEDS_TEXT
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data
    p.write_bytes(data)
    seeds, problems = read_seeds(p, "baseline")
    assert problems == {}
    assert seeds[("sub-01", "ses-baseline")].seed_ras_mm == (1.5, -2.0, 3.0)
    assert seeds[("sub-02", "ses-baseline")].seed_ras_mm == (4.0, 5.0, 6.0)


def test_seeds_in_another_encoding_name_the_file_and_the_encoding(tmp_path):
    p = tmp_path / "seeds.tsv"
    p.write_bytes("participant_id\tx\ty\tz\tnote\nsub-01\t1\t2\t3\tl\u00e9sion\n".encode("cp1252"))
    with pytest.raises(ValueError, match=f"{p}.*not UTF-8.*UTF-16"):
        read_seeds(p, "baseline")
    q = tmp_path / "utf16_without_bom.tsv"
    q.write_bytes(SEEDS_TEXT.encode("utf-16-le"))
    with pytest.raises(ValueError, match=f"{q}.*not UTF-8"):
        read_seeds(q, "baseline")


def test_study_reference_session_and_masks(tmp_path):
    img = tmp_path / "img"
    for ses in ("baseline", "m06"):
        _t2(img, "01", ses)
        _t2(img, "02", ses)
    masks = tmp_path / "masks"
    save_nifti(masks / "sub-02/ses-baseline/anat/sub-02_ses-baseline_label-lesion_mask.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    seeds = tmp_path / "seeds.tsv"
    seeds.write_text("participant_id\tx\ty\tz\nsub-01\t1\t1\t1\nsub-09\t0\t0\t0\n")
    config = validate_config({"imaging_dir": str(img), "masks_dir": str(masks), "seeds": str(seeds), "sessions": SESSIONS})
    study = discover_study(config)
    assert reference_session(study, "sub-01", "ses-baseline") == "ses-baseline"
    assert reference_session(study, "sub-02", "ses-baseline") == "ses-baseline"  # from the reader mask
    assert any("sub-09" in p for p in study.problems)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unexpected|Additional properties"):
        validate_config({"imaging_dir": "x", "imagin_dir": "y"})
    with pytest.raises(ConfigError, match="sessions"):
        validate_config({"imaging_dir": "x", "sessions": {"baseline": "zero"}})
    with pytest.raises(ConfigError, match="month 0"):
        validate_config({"imaging_dir": "x", "sessions": {"a": 0, "b": 0}})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("imaging_dir: 3\n")
    with pytest.raises(ConfigError, match=str(cfg)):
        load_config(cfg)
    filled = validate_config({"imaging_dir": "x"})
    assert filled["sessions"]["m12"] == 12 and filled["results_dir"] == "results"


def test_repository_default_config_is_valid():
    from pathlib import Path

    config = load_config(Path(__file__).parents[1] / "config" / "config.yaml")
    assert config["sessions"]["baseline"] == 0
    # the blinded-reading demo is a whole config of its own, not an extension
    qa = load_config(Path(__file__).parents[1] / "config" / "demo_qa.yaml")
    assert qa["imaging_dir"] == str(Path(__file__).parents[1] / "demo" / "imaging") and qa["readers"] == ["R1", "R2"]


def test_config_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    """A study's config names its files from its own folder, wherever the run starts."""
    import os

    study = tmp_path / "trial" / "my_study.yaml"
    study.parent.mkdir()
    study.write_text("imaging_dir: imaging\nseeds: tables/seeds.tsv\nallocation: ../shared/alloc.tsv\n"
                     "masks_dir: /abs/masks\narms: [a, b]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = resolve_config([os.path.relpath(study)])
    assert config["imaging_dir"] == str(tmp_path / "trial" / "imaging")
    assert config["seeds"] == str(tmp_path / "trial" / "tables" / "seeds.tsv")
    assert config["allocation"] == str(tmp_path / "shared" / "alloc.tsv")
    assert config["masks_dir"] == "/abs/masks"
    assert config["results_dir"] == str(tmp_path / "trial" / "results")  # the default, beside the config
    # --config values are typed in a shell: relative to the current folder
    assert resolve_config([study], {"results_dir": "out"})["results_dir"] == str(elsewhere / "out")


def test_resolve_config_replaces_top_level_keys_and_defaults_the_rest(tmp_path):
    from pathlib import Path

    demo = Path(__file__).parents[1] / "config" / "config.yaml"
    study = tmp_path / "study.yaml"
    study.write_text("imaging_dir: /data/khe\nsessions: {screening: 0, m06: 6}\nprimary_month: 6\n")
    alone = resolve_config([study])
    assert alone["seeds"] is None and alone["allocation"] is None and alone["arms"] is None
    assert alone["masks_dir"] is None and alone["sessions"] == {"screening": 0, "m06": 6}
    # after the demo config (snakemake --configfile demo.yaml study.yaml): sessions replaced, not merged
    both = resolve_config([demo, study])
    assert both["sessions"] == {"screening": 0, "m06": 6}
    assert resolve_config([study], {"results_dir": "/elsewhere"})["results_dir"] == "/elsewhere"
    with pytest.raises(ConfigError, match="--configfile config/config.yaml"):
        resolve_config([])
    bad = tmp_path / "list.yaml"
    bad.write_text("- imaging_dir\n")
    with pytest.raises(ConfigError, match=f"{bad}.*mapping"):
        resolve_config([bad])


def test_series_plan_reader_mask_beats_seed_beats_tracking(tmp_path):
    from khe_vol.plan import series_plan

    img, masks = tmp_path / "imaging", tmp_path / "masks"
    for pid in ("01", "02", "03"):
        for ses in SESSIONS:
            _t2(img, pid, ses)
    # sub-01: seed at baseline, reader mask at m12; sub-02: reader mask at m06 only; sub-03: nothing.
    for pid, ses in (("01", "m12"), ("02", "m06")):
        save_nifti(masks / f"sub-{pid}/ses-{ses}/anat/sub-{pid}_ses-{ses}_label-lesion_mask.nii.gz",
                   np.ones((4, 4, 4), np.uint8), np.eye(4))
    seeds = tmp_path / "seeds.tsv"
    seeds.write_text("participant_id\tx\ty\tz\nsub-01\t1\t2\t3\n")
    config = validate_config({"imaging_dir": str(img), "masks_dir": str(masks), "seeds": str(seeds), "sessions": SESSIONS})
    plans = series_plan(discover_study(config), "ses-baseline")
    plan = {k: (p.source, p.reference_session_id) for k, p in plans.items()}
    assert plan[("sub-01", "ses-baseline")] == ("seed", None)
    assert plan[("sub-01", "ses-m06")] == ("tracked", "ses-baseline")
    assert plan[("sub-01", "ses-m12")] == ("reader_mask", None)
    assert plan[("sub-02", "ses-baseline")] == ("tracked", "ses-m06")
    assert plan[("sub-02", "ses-m06")] == ("reader_mask", None)
    assert plan[("sub-02", "ses-m12")] == ("tracked", "ses-m06")
    # Nothing to segment from: the baseline waits for a (reader's) seed, the rest are tracked from it once seeded.
    assert plan[("sub-03", "ses-baseline")] == ("needs_seed", None)
    assert {plan[("sub-03", f"ses-{s}")] for s in SESSIONS if s != "baseline"} == {("tracked", "ses-baseline")}


def test_segmentation_overrides_are_checked_by_the_schema_naming_the_key(tmp_path):
    import dataclasses

    from khe_vol.config import load_schema
    from khe_vol.segmentation.params import SegmentationParams

    schema = load_schema()["properties"]["segmentation"]["properties"]
    json_type = {"float": "number", "int": "integer", "bool": "boolean", "str": "string"}
    fields = {f.name: json_type[f.type if isinstance(f.type, str) else f.type.__name__]
              for f in dataclasses.fields(SegmentationParams)}
    assert {k: v["type"] for k, v in schema.items()} == fields
    base = {"imaging_dir": str(tmp_path)}
    validate_config(base | {"segmentation": {"max_radius_mm": 120, "bias_correction": False}})
    with pytest.raises(ConfigError, match="max_radius_m"):
        validate_config(base | {"segmentation": {"max_radius_m": 120}})
    with pytest.raises(ConfigError, match="segmentation/n4_iterations"):
        validate_config(base | {"segmentation": {"n4_iterations": "many"}})
    validate_config(base | {"segmentation": {"engine": "hybrid"}})
    with pytest.raises(ConfigError, match="segmentation/engine"):
        validate_config(base | {"segmentation": {"engine": "nnunet"}})
