"""``khe-vol run``: the whole workflow on one study config, from any folder.

The Snakefile, its rules and profiles come with khe-vol (the checkout, or the
copy a built package carries); the study's config names its files from its own
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

    The checkout's own (a source tree, or an editable install), else the copy
    a built package carries in ``khe_vol/_workflow/`` (there, links to the
    checkout's files that the wheel stores as files).

    Raises
    ------
    WorkflowFilesMissing
        Neither is there.
    """
    package = Path(__file__).resolve().parent
    for root in (package.parent, package / "_workflow"):
        if (root / "Snakefile").is_file() and (root / "workflow" / "rules").is_dir():
            return root
    raise WorkflowFilesMissing(f"no khe-vol Snakefile with this package ({package}): reinstall khe-vol "
                               "from its repository (pip install ., or pip install -e . for a checkout)")


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
    # The rules call `khe-vol`: this installation's, also from a virtualenv that is not activated.
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    code = subprocess.call(snakemake_command(config_path, cores, profile, extra), env=env)
    if code == 0 and report is not None:
        code = subprocess.call(snakemake_command(config_path, cores, profile, extra, report=report), env=env)
    return code
