"""`khe-vol run`: a study folder of its own, outside the repository, run from anywhere."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_workflow import read_tsv

# End to end: `pytest -m "not slow"` leaves these out.
pytestmark = pytest.mark.slow


def khe_vol(*args, cwd):
    return subprocess.run([sys.executable, "-m", "khe_vol.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A coordinator's folder: the demo's images and tables, a config with paths relative to itself."""
    root = tmp_path_factory.mktemp("coordinator")
    folder = root / "trial"
    subprocess.run([sys.executable, "-m", "khe_vol.cli", "demo", str(folder / "data"), "--participants", "2"],
                   check=True, capture_output=True)
    config = folder / "my_study.yaml"
    config.write_text(yaml.safe_dump({
        "imaging_dir": "data/imaging", "seeds": "data/seeds.tsv", "allocation": "data/allocation.tsv",
        "arms": ["sirolimus_prednisolone", "sirolimus"],  # no results_dir: results/ beside the config
    }))
    (root / "elsewhere").mkdir()
    return root, folder, config


def test_a_dry_run_passes_snakemake_flags_through(study):
    root, folder, config = study
    proc = khe_vol("run", "trial/my_study.yaml", "--cores", "1", "--dry-run", cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "measure_series" in proc.stdout + proc.stderr and not (folder / "results").exists()


def test_run_from_another_folder_writes_beside_the_config(study):
    root, folder, config = study
    proc = khe_vol("run", config, "--cores", "2", "--report", cwd=root / "elsewhere")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_tsv(folder / "results" / "volumes.tsv")
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert (folder / "results" / "report.html").stat().st_size > 0
    assert (folder / ".snakemake").is_dir() and not (root / "elsewhere" / ".snakemake").exists()
    assert list((root / "elsewhere").iterdir()) == []


def test_a_bad_config_names_the_file(study):
    root, folder, _ = study
    bad = folder / "typo.yaml"
    bad.write_text("imagin_dir: data/imaging\n")
    proc = khe_vol("run", bad, cwd=root)
    assert proc.returncode == 2 and str(bad) in proc.stderr and "imagin_dir" in proc.stderr


def test_an_installed_wheel_carries_the_workflow(study, tmp_path):
    """`pip install` of a built wheel (not the checkout) runs the same workflow."""
    root, folder, _ = study
    repo = Path(__file__).resolve().parents[1]
    # Built from a copy: a build writes build/ and *.egg-info beside the sources it is given.
    source = tmp_path / "source"
    shutil.copytree(repo, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "node_modules", ".snakemake", "build", "*.egg-info", "results*", "demo", "dicom_demo", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=600)
    venv = tmp_path / "venv"
    # The dependencies are this interpreter's; the package is the wheel's copy alone.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    wheel = next((tmp_path / "dist").glob("khe_vol-*.whl"))
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    probe = subprocess.run([str(venv / "bin/python"), "-c", "import khe_vol.run as r; print(r.workflow_root())"],
                           cwd=tmp_path, capture_output=True, text=True, check=True)
    assert str(venv) in probe.stdout and probe.stdout.strip().endswith("_workflow"), probe.stdout
    proc = subprocess.run([str(venv / "bin/khe-vol"), "run", "trial/my_study.yaml", "--cores", "1", "--dry-run",
                           "--forceall"],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "measure_series" in proc.stdout + proc.stderr
