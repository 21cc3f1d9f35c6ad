"""The run configuration: one resolution for the workflow and ``khe-vol check``.

:func:`resolve_config` is the only way a config is read: the Snakefile calls it
with Snakemake's ``--configfile`` files and ``--config`` values, and
``khe-vol check`` with its config file(s), so both see the same keys, defaults
and errors. Nothing comes from the repository's demo config unless it is one of
the files given: a key no file sets takes the schema's documented default
(``khe_vol/schemas/config.schema.yaml``: null or empty for ``seeds``, ``masks_dir``,
``allocation``, ``arms``).
A later file replaces an earlier file's top-level key as a whole: a study's
``sessions`` mapping is its own, never merged with another's.
"""

from __future__ import annotations

import copy
from importlib import resources
import os
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(str(resources.files("khe_vol") / "schemas" / "config.schema.yaml"))


class ConfigError(ValueError):
    """The configuration is invalid; the message says which key and why."""


def load_schema():
    """The config JSON schema as a dict."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def validate_config(config):
    """Validate a config dict and fill top-level defaults.

    Parameters
    ----------
    config : dict
        Parsed YAML configuration.

    Returns
    -------
    dict
        A copy with schema defaults filled in.

    Raises
    ------
    ConfigError
        Naming every offending key, for unknown keys and wrong types alike.
    """
    schema = load_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_cls(schema).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        lines = []
        for err in errors:
            where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
            lines.append(f"  {where}: {err.message}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))
    filled = copy.deepcopy(config)
    for key, spec in schema["properties"].items():
        if key not in filled and "default" in spec:
            filled[key] = copy.deepcopy(spec["default"])
    baselines = [label for label, month in filled["sessions"].items() if month == 0]
    if len(baselines) != 1:
        raise ConfigError(
            "invalid configuration:\n  sessions: exactly one session must be month 0 "
            f"(the baseline); found {baselines or 'none'}"
        )
    problems = []
    if filled["readers"] and filled["qa_seed"] is None:
        problems.append("qa_seed: readers are set, so a qa_seed (a secret integer) is required for the case codes")
    if filled["adjudicator"] is not None:
        if len(filled["readers"]) != 2:
            problems.append("adjudicator: adjudication needs exactly two readers")
        if filled["adjudicator"] in filled["readers"]:
            problems.append(f"adjudicator: {filled['adjudicator']} is also one of the readers")
    if filled["allocation"] is not None and not filled["arms"]:
        problems.append("arms: allocation is set, so arms (experimental arm first) must list the arm names")
    if filled["allocation"] is not None and filled["primary_month"] not in filled["sessions"].values():
        problems.append(f"primary_month: {filled['primary_month']} is not the month of any session in sessions")
    if filled["dicom_export"] and not filled["dicom_uid_map"]:
        problems.append(
            "dicom_uid_map: dicom_export is true, so dicom_uid_map must name the uid map khe-vol import wrote "
            "(dicom_uids.tsv beside the imaging folder): without it no SEG can reference its source series"
        )
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))
    return filled


#: What to do when a run names no config (Snakemake without --configfile).
NO_CONFIG_MESSAGE = (
    "no configuration given: pass one with --configfile, e.g. "
    "`snakemake --cores 2 --configfile config/config.yaml` for the demo cohort (after `khe-vol demo demo`) "
    "or `--configfile my_study.yaml` for a study (every key is documented in khe_vol/schemas/config.schema.yaml)"
)


#: Config keys that name a file or folder: a relative one is relative to the config file's folder.
PATH_KEYS = ("imaging_dir", "seeds", "masks_dir", "results_dir", "allocation", "dicom_uid_map")


def absolute_paths(config, base_dir):
    """``config`` with each relative :data:`PATH_KEYS` value made absolute against ``base_dir``.

    Why: a study's config sits in the study's folder and names its files from
    there, wherever the run is started (``khe-vol run`` from anywhere, Snakemake
    from the repository). Values that are not strings (null, or a wrong type
    the schema then reports) are left as they are.
    """
    base_dir = os.path.abspath(base_dir)
    return {key: (os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
                  if key in PATH_KEYS and isinstance(value, str) and value else value)
            for key, value in config.items()}


def _read_config_file(path):
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: configuration must be a YAML mapping of keys to values")
    return absolute_paths(config, path.parent)


def resolve_config(config_files=(), overrides=None):
    """The run's configuration from its config files, validated, with defaults filled.

    Parameters
    ----------
    config_files : sequence of path-like
        YAML files in order (Snakemake's ``--configfile``). A later file's
        top-level key replaces an earlier one's whole value (a ``sessions``
        mapping is replaced, not merged).
    overrides : mapping, optional
        Top-level keys set last (Snakemake's ``--config key=value``).

    Returns
    -------
    dict
        The validated config (:func:`validate_config`): every key the files
        leave out has the schema's default, never another study's value.

    Raises
    ------
    ConfigError
        No file and no override (:data:`NO_CONFIG_MESSAGE`), a file that
        cannot be read, or an invalid config (naming the file(s) and keys).
    """
    config_files = [Path(p) for p in config_files]
    overrides = dict(overrides or {})
    if not config_files and not overrides:
        raise ConfigError(NO_CONFIG_MESSAGE)
    config = {}
    for path in config_files:
        config.update(_read_config_file(path))
    if config_files and "results_dir" not in config and "results_dir" not in overrides:
        # The default too sits beside the config naming the study.
        config["results_dir"] = os.path.join(os.path.abspath(config_files[-1].parent), "results")
    # --config values are typed in a shell: relative to where it runs.
    config.update(absolute_paths(overrides, os.getcwd()))
    try:
        return validate_config(config)
    except ConfigError as exc:
        where = ", ".join(str(p) for p in config_files) or "--config"
        raise ConfigError(f"{where}: {exc}") from None


def load_config(path):
    """Read one YAML config file and validate it (see :func:`resolve_config`)."""
    return resolve_config([path])


def baseline_session(config):
    """Label of the month-0 session (without ``ses-``)."""
    return next(label for label, month in config["sessions"].items() if month == 0)
