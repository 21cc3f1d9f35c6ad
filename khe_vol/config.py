"""Loading and validating the workflow configuration outside Snakemake.

The workflow validates its config with ``snakemake.utils.validate`` against
the same schema (``khe_vol/schemas/config.schema.yaml``); ``khe-vol check``
uses :func:`load_config` so both agree on defaults and errors.
"""

from __future__ import annotations

import copy
from importlib import resources
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
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))
    return filled


def load_config(path):
    """Read a YAML config file and validate it (see :func:`validate_config`)."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: configuration must be a YAML mapping")
    try:
        return validate_config(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def baseline_session(config):
    """Label of the month-0 session (without ``ses-``)."""
    return next(label for label, month in config["sessions"].items() if month == 0)
