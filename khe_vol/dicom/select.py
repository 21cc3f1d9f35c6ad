"""Which series of a study is the T2: the documented rule (config ``dicom_series_rule``).

A series is a T2 candidate when all of these hold (each can be changed in the
study config; :data:`DEFAULT_RULE` is the default):

* it is an MR image, not derived (ImageType without DERIVED, LOCALIZER,
  SECONDARY: reformats, MIPs and scouts are not acquisitions), unless
  ``allow_derived``;
* its SeriesDescription or ProtocolName, lower-cased with every character but
  letters, digits and ``*`` turned into a space (``t2_tse_fs_tra`` -> ``t2 tse fs tra``),
  matches ``include`` and does not match ``exclude`` (Python regular
  expressions, searched anywhere). The default includes every T2 with or
  without fat suppression and STIR / TIRM (KHE trials image on fat-suppressed
  T2 or STIR), and excludes FLAIR, T2*, diffusion, maps and scouts;
* its sequence parameters, when the header has them: EchoTime >=
  ``min_echo_time_ms`` (30 ms: above T1 and most PD, and low enough for the
  short TE of many STIR protocols), RepetitionTime >= ``min_repetition_time_ms``
  (1500 ms), InversionTime <= ``max_inversion_time_ms`` (400 ms: STIR's
  150-250 ms passes, FLAIR's 2000+ does not);
* MRAcquisitionType is ``acquisition`` (``2D``, ``3D`` or ``any``, the default).

Two candidates in one study is an error naming both, unless the visits
table's ``series_number`` names the one to take.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The default series rule (see the module docstring); config ``dicom_series_rule`` overrides any key.
DEFAULT_RULE = {
    "include": r"t2|stir|tirm",
    "exclude": r"flair|t2 ?\*|t2 ?star|\b(?:swi|dwi|diff\w*|adc|trace|map|mip|mpr|loc\w*|scout|survey|cal\w*)\b",
    "min_echo_time_ms": 30.0,
    "min_repetition_time_ms": 1500.0,
    "max_inversion_time_ms": 400.0,
    "acquisition": "any",
    "allow_derived": False,
}

_NOT_ACQUIRED = ("DERIVED", "LOCALIZER", "SECONDARY")


class RuleError(ValueError):
    """The series rule in the config is unusable; the message names the key."""


@dataclass(frozen=True)
class Verdict:
    """Whether a series is a T2 candidate, and why (or why not)."""

    candidate: bool
    reason: str


def series_rule(overrides=None):
    """The series rule: :data:`DEFAULT_RULE` with the config's ``dicom_series_rule`` keys over it.

    Raises
    ------
    RuleError
        An unknown key or a regular expression that does not compile, naming the key.
    """
    rule = dict(DEFAULT_RULE)
    for key, value in (overrides or {}).items():
        if key not in DEFAULT_RULE:
            raise RuleError(f"dicom_series_rule/{key}: unknown key (known: {', '.join(DEFAULT_RULE)})")
        rule[key] = value
    for key in ("include", "exclude"):
        try:
            rule[f"{key}_re"] = re.compile(rule[key] or r"(?!)", re.IGNORECASE)
        except re.error as exc:
            raise RuleError(f"dicom_series_rule/{key}: not a regular expression ({exc})") from None
    if rule["acquisition"] not in ("2D", "3D", "any"):
        raise RuleError(f"dicom_series_rule/acquisition: must be 2D, 3D or any, not {rule['acquisition']!r}")
    return rule


def normalised_text(text):
    """Lower case, every character but letters, digits and ``*`` a space, spaces collapsed."""
    return " ".join(re.sub(r"[^a-z0-9*]+", " ", (text or "").lower()).split())


def judge_series(series, rule):
    """Apply the rule to one series.

    Parameters
    ----------
    series : khe_vol.dicom.series.DicomSeries
    rule : dict
        From :func:`series_rule`.

    Returns
    -------
    Verdict
    """
    if series.modality and series.modality != "MR":
        return Verdict(False, f"modality {series.modality}, not MR")
    not_acquired = [t for t in _NOT_ACQUIRED if t in series.image_type]
    if not_acquired and not rule["allow_derived"]:
        return Verdict(False, f"ImageType {'/'.join(not_acquired)} (a reformat or scout, not an acquisition)")
    names = list(dict.fromkeys(normalised_text(t) for t in (series.series_description, series.protocol_name) if t))
    if not any(rule["include_re"].search(t) for t in names):
        return Verdict(False, f"description/protocol {' / '.join(names) or '(none)'} does not match "
                              f"include /{rule['include']}/")
    excluded = [t for t in names if rule["exclude_re"].search(t)]
    if excluded:
        return Verdict(False, f"description/protocol {excluded[0]} matches exclude /{rule['exclude']}/")
    te, tr, ti = series.echo_time_ms, series.repetition_time_ms, series.inversion_time_ms
    if te is not None and te < rule["min_echo_time_ms"]:
        return Verdict(False, f"EchoTime {te:g} ms < {rule['min_echo_time_ms']:g} ms")
    if tr is not None and tr < rule["min_repetition_time_ms"]:
        return Verdict(False, f"RepetitionTime {tr:g} ms < {rule['min_repetition_time_ms']:g} ms")
    if ti is not None and ti > rule["max_inversion_time_ms"]:
        return Verdict(False, f"InversionTime {ti:g} ms > {rule['max_inversion_time_ms']:g} ms (FLAIR-like)")
    acq = (series.acquisition_type or "").upper()
    if rule["acquisition"] != "any" and acq and acq != rule["acquisition"]:
        return Verdict(False, f"MRAcquisitionType {acq}, rule asks for {rule['acquisition']}")
    params = ", ".join(f"{name} {v:g} ms" for name, v in (("TE", te), ("TR", tr), ("TI", ti)) if v is not None)
    return Verdict(True, f"matches the T2 rule ({params or 'no sequence parameters in the header'})")


def choose_t2(series_list, rule, series_number=None):
    """The T2 series of one study.

    Parameters
    ----------
    series_list : list of DicomSeries
        Every series of the study.
    rule : dict
    series_number : int, optional
        The visits table's choice: this series is taken if it exists, whatever the rule says.

    Returns
    -------
    chosen : DicomSeries or None
    verdicts : list of Verdict
        One per series, in order.
    problem : str or None
        Why none was chosen: no candidate, two or more (naming each), or
        ``series_number`` not in the study.
    """
    verdicts = [judge_series(s, rule) for s in series_list]
    if series_number is not None:
        named = [s for s in series_list if s.series_number == series_number]
        if len(named) == 1:
            return named[0], verdicts, None
        return None, verdicts, (f"the visits table names series {series_number}, which the study has "
                                f"{'twice' if named else 'not'} (series: "
                                f"{', '.join(s.label for s in series_list)})")
    candidates = [s for s, v in zip(series_list, verdicts) if v.candidate]
    if len(candidates) == 1:
        return candidates[0], verdicts, None
    if not candidates:
        seen = "; ".join(f"{s.label}: {v.reason}" for s, v in zip(series_list, verdicts))
        return None, verdicts, f"no T2 series found ({seen}); adjust dicom_series_rule or name the series " \
                               "in the visits table's series_number column"
    return None, verdicts, (f"{len(candidates)} series match the T2 rule: "
                            f"{' and '.join(s.label for s in candidates)}; make dicom_series_rule stricter or "
                            "name the series in the visits table's series_number column")
