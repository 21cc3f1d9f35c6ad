"""``khe-vol run``: the whole workflow on one study config, from any folder.

The Snakefile, its rules and profiles come with khe-vol (the repository this
package is installed from); the study's config names its files from its own
folder (:func:`khe_vol.config.absolute_paths`). Snakemake runs in the config's
folder, so its ``.snakemake/`` bookkeeping stays with the study.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


class WorkflowFilesMissing(RuntimeError):
    """This installation of khe-vol has no Snakefile beside it."""


def workflow_root():
    """The folder holding khe-vol's ``Snakefile``, ``workflow/`` and ``profiles/``.

    Raises
    ------
    WorkflowFilesMissing
        Installed without them (a wheel built from the package alone).
    """
    root = Path(__file__).resolve().parents[1]
    if not (root / "Snakefile").is_file() or not (root / "workflow" / "rules").is_dir():
        raise WorkflowFilesMissing(
            f"no khe-vol Snakefile beside the package ({root}): install khe-vol from its repository "
            "(git clone, then pip install -e .) so that the workflow files come with it")
    return root


def profile_path(profile, root):
    """A ``--profile`` value: one of khe-vol's own profiles by name (``slurm``), else as given."""
    own = Path(root) / "profiles" / str(profile)
    return str(own) if own.is_dir() else str(profile)


def snakemake_command(config_path, cores=None, profile=None, extra=(), report=None):
    """The Snakemake command line of one run.

    Parameters
    ----------
    config_path : path-like
        The study's config YAML.
    cores : int, optional
        ``--cores`` (Snakemake's default: all of this machine's when no
        profile sets it).
    profile : str, optional
        A profile name among khe-vol's (``slurm``) or a profile folder.
    extra : sequence of str
        Further Snakemake flags, passed through unchanged.
    report : path-like, optional
        Write Snakemake's HTML report there instead of running jobs.

    Returns
    -------
    list of str
    """
    root = workflow_root()
    config_path = Path(config_path).resolve()
    cmd = [sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"),
           "--directory", str(config_path.parent), "--configfile", str(config_path)]
    if profile:
        cmd += ["--profile", profile_path(profile, root)]
    if cores is not None:
        cmd += ["--cores", str(cores)]
    elif not profile:
        cmd += ["--cores", "all"]
    if report is not None:
        cmd += ["--report", os.path.abspath(report)]
    return cmd + list(extra)


def run_workflow(config_path, cores=None, profile=None, extra=(), report=None):
    """Run the workflow (and then write its report when ``report`` is given); the exit code."""
    code = subprocess.call(snakemake_command(config_path, cores, profile, extra))
    if code == 0 and report is not None:
        code = subprocess.call(snakemake_command(config_path, cores, profile, extra, report=report))
    return code
