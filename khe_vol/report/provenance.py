"""Provenance: which software, configuration and inputs made a result.

Every table's JSON dictionary and every mask sidecar carries
:func:`software_versions`; ``<results_dir>/provenance.json`` summarises a run
(:func:`run_provenance`). Nothing here depends on the time or the machine, so
a rerun in the same environment gives the same bytes.
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from khe_vol import __version__
from khe_vol.files import sha256_file

#: Packages whose versions can change a result.
PACKAGES = ("nibabel", "SimpleITK", "numpy", "scipy", "scikit-image", "snakemake", "statsmodels", "pingouin")


def git_commit(path=None):
    """Commit of the git checkout holding ``path`` (this package by default), or None.

    A checkout with uncommitted changes gets a ``-dirty`` suffix: its results
    are not reproducible from the commit alone.
    """
    where = Path(path or __file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # an installed package, or no git: the version alone says it
    return f"{commit}-dirty" if dirty else commit


@lru_cache(maxsize=1)
def software_versions():
    """khe-vol version and git commit, and the versions of the packages results depend on."""
    versions = {"khe_vol": __version__, "khe_vol_git_commit": git_commit()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def series_inputs(records):
    """Input files, checksums and seeds of every series, from the per-series records."""
    keys = ("participant_id", "session_id", "source_file", "source_sha256", "seed_ras_mm",
            "reader_mask_file", "reader_mask_sha256", "status")
    return [{k: rec.get(k) for k in keys} for rec in records]


def run_provenance(config, records, outputs):
    """The summary written to ``provenance.json``.

    Parameters
    ----------
    config : dict
        The validated run configuration.
    records : list of dict
        Per-series records.
    outputs : dict
        Output file name -> sha256.

    Returns
    -------
    dict
    """
    if config and config.get("qa_seed") is not None:
        # The seed unblinds case codes; it lives in the key, not in results.
        config = {**config, "qa_seed": "(secret: see the unblinding key)"}
    return {
        "GeneratedBy": {"Name": "khe-vol", **software_versions()},
        "Config": config,
        "Inputs": series_inputs(records),
        "Outputs": outputs,
    }


def table_provenance(inputs):
    """Provenance of a table made from files: software, and each input with its sha256."""
    return {"GeneratedBy": {"Name": "khe-vol", **software_versions()},
            "Inputs": {str(path): sha256_file(path) for path in inputs}}
