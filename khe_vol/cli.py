"""The ``khe-vol`` command: the workflow's steps, each usable on its own."""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

from khe_vol import __version__
from khe_vol.qa import SERVE_THREADS


def _cmd_demo(args):
    from khe_vol.synthetic.demo import write_demo_cohort

    out = Path(args.out_dir)
    with tempfile.TemporaryDirectory(prefix=".khe-vol-demo-", dir=out.parent if out.parent.exists() else None) as tmp:
        if args.dicom:
            from khe_vol.synthetic.dicom import write_dicom_demo

            write_dicom_demo(tmp, rng_seed=args.seed)
        else:
            write_demo_cohort(tmp, n_participants=args.participants, rng_seed=args.seed)
        # Copy only what changed, so a second run leaves mtimes alone and
        # Snakemake sees nothing to redo.
        for src in sorted(Path(tmp).rglob("*")):
            if src.is_dir():
                continue
            dst = out / src.relative_to(tmp)
            if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    if args.dicom:
        print(f"DICOM demo in {out}/ (site_export/, visits.tsv, seeds.tsv, study.yaml, truth.tsv): from there, "
              "khe-vol import site_export/ --out study/imaging --visits visits.tsv --config study.yaml")
    else:
        print(f"demo cohort in {out}/ (imaging/, seeds.tsv, allocation.tsv, truth.tsv, truth/)")
    return 0


def _load_config_arg(args):
    # The same resolution as the workflow's (khe_vol.config.resolve_config).
    from khe_vol.config import resolve_config

    overrides = json.loads(args.config_json) if args.config_json else None
    return resolve_config(args.config, overrides)


def _cmd_check(args):
    from khe_vol.check import REPORT_COLUMNS, check_study, check_warnings, format_report
    from khe_vol.config import ConfigError

    try:
        config = _load_config_arg(args)
    except (ConfigError, ValueError) as exc:
        print(f"khe-vol check: {exc}", file=sys.stderr)
        return 2
    try:
        problems = check_study(config, headers_only=args.headers_only)
        warnings = check_warnings(config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"khe-vol check: {exc}", file=sys.stderr)
        return 2
    report = format_report(problems, warnings)
    if args.report:
        from khe_vol.files import atomic_write_text

        atomic_write_text(args.report, report)
        if args.report.endswith(".tsv"):
            atomic_write_text(args.report[: -len(".tsv")] + ".json", json.dumps(REPORT_COLUMNS, indent=2) + "\n")
    if problems or warnings:  # the table only when it has rows: a bare header reads as a fault
        print(report, end="")
    n = len(problems)
    found = [f"{n} problem(s) found" if n else "no problems found"]
    if warnings:
        found.append(f"{len(warnings)} warning(s)")
    print(", ".join(found), file=sys.stderr)
    return 1 if n and not args.no_fail else 0


def _cmd_run(args):
    from khe_vol.config import ConfigError, load_config
    from khe_vol.run import WorkflowFilesMissing, run_workflow

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"khe-vol run: {exc}", file=sys.stderr)
        return 2
    report = None
    if args.report is not None:
        report = args.report or str(Path(config["results_dir"]) / "report.html")
    try:
        return run_workflow(args.config, args.cores, args.profile, args.snakemake_args, report)
    except WorkflowFilesMissing as exc:
        print(f"khe-vol run: {exc}", file=sys.stderr)
        return 2


def _cmd_series(args):
    import numpy as np
    import SimpleITK as sitk

    from khe_vol.files import atomic_write_bytes, atomic_write_text, read_records
    from khe_vol.nifti import load_image, mask_image, write_nifti
    from khe_vol.series import measure_series

    # Snakemake runs series side by side, one thread each: more ITK threads
    # per job would only contend for the same cores.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, args.threads))
    reference = None
    if args.reference_record:
        ref_record = read_records([args.reference_record])[0]
        ref_mask = None
        if ref_record["status"] == "ok":
            ref_mask = (load_image(args.reference_mask, "mask").data != 0).astype(np.uint8)
        reference = {"record": ref_record, "mask": ref_mask}
    month = None if args.month in (None, "n/a") else int(args.month)
    record, mask, affine = measure_series(
        args.participant,
        args.session,
        month,
        args.image,
        problem=args.problem,
        seed_ras_mm=args.seed,
        reader_mask_path=args.reader_mask,
        reference=reference,
        params_overrides=json.loads(args.segmentation_json) if args.segmentation_json else None,
        needs_seed=args.needs_seed,
    )
    if mask is None:
        atomic_write_bytes(args.mask, b"")  # no mask: an empty placeholder file
    else:
        write_nifti(args.mask, mask_image(mask, affine))
    atomic_write_text(args.record, json.dumps(record, indent=2) + "\n")
    print(f"{record['participant_id']} {record['session_id']}: {record['status']}"
          + (f" {record['volume_ml']:.3f} mL" if record["status"] == "ok" else f" ({record['message']})"))
    return 0


def _ras_numbers(text, names):
    """Comma-separated RAS+ mm numbers, one per name (argparse types below)."""
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != len(names) or not all(map(math.isfinite, values)):
        raise argparse.ArgumentTypeError(
            f"expected {','.join(names)} in RAS+ mm ({ {3: 'three', 6: 'six'}[len(names)]} numbers), got {text!r}")
    return values


def _ras_point(text):
    """``X,Y,Z`` in RAS+ mm (argparse type)."""
    return _ras_numbers(text, ("X", "Y", "Z"))


def _ras_box(text):
    """``X0,Y0,Z0,X1,Y1,Z1``: two opposite corners of a box, RAS+ mm (argparse type)."""
    return _ras_numbers(text, ("X0", "Y0", "Z0", "X1", "Y1", "Z1"))


class _ClickAction(argparse.Action):
    """Collect --include / --exclude points into one list, in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        clicks = list(getattr(namespace, "clicks", None) or [])
        clicks.append((self.const, values))
        namespace.clicks = clicks


def _cmd_segment(args):
    from khe_vol.config import resolve_config
    from khe_vol.files import atomic_write_text
    from khe_vol.nifti import SeriesError, load_series, mask_image, write_nifti
    from khe_vol.segmentation.interactive import BOX, Click, segment_clicks
    from khe_vol.segmentation.params import SegmentationError
    from khe_vol.series import reader_mask_on_grid, segmentation_params

    try:
        params = segmentation_params(resolve_config([args.config])["segmentation"] if args.config else None)
        image = load_series(args.image)
        start = None
        if args.start_mask and args.box:
            raise ValueError("give --box or --start-mask, not both: each is where the clicks start")
        if args.start_mask:  # any reader-mask format, checked, brought onto the image grid by position
            start = reader_mask_on_grid(args.start_mask, image)[0] != 0
        # A box is the first interaction: the learned engine's mask inside it; the clicks steer it.
        clicks = [Click(BOX, args.box)] if args.box else []
        clicks += [Click(kind, point) for kind, point in (args.clicks or [])]
        if not clicks and start is None:
            raise ValueError("nothing to segment from: give --box, --start-mask or an --include click")
        mask, info = segment_clicks(image.data, image.affine, clicks, start_mask=start, params=params)
    except (SeriesError, SegmentationError, ValueError, OSError) as exc:
        print(f"khe-vol segment: {exc}", file=sys.stderr)
        return 1
    write_nifti(args.out, mask_image(mask, image.affine))
    if args.record:
        record = {"image": str(args.image), "image_sha256": image.sha256, "start_mask": args.start_mask,
                  "clicks": [c.as_dict() for c in clicks], **info}
        atomic_write_text(args.record, json.dumps(record, indent=2) + "\n")
    print(f"{args.out}: {info['volume_ml']:.3f} mL after {info['n_clicks']} interaction(s)")
    return 0


def _cmd_import(args):
    from khe_vol.config import ConfigError, load_schema, resolve_config
    from khe_vol.dicom.importer import DicomImportError, import_dicom

    try:
        if args.config:
            config = resolve_config([args.config])
            rule, sessions = config["dicom_series_rule"], config["sessions"]
            if Path(config["imaging_dir"]).resolve() != Path(args.out).resolve():
                print(f"khe-vol import: note: {args.config} reads imaging_dir {config['imaging_dir']}, "
                      f"not {args.out}", file=sys.stderr)
        else:
            rule, sessions = None, (load_schema()["properties"]["sessions"]["default"]
                                    if args.month_window is not None else None)
        outcomes, scan_problems, paths = import_dicom(
            args.dicom_dir, args.out, args.visits, rule_overrides=rule, sessions=sessions,
            month_window=args.month_window, uid_map_path=args.uid_map, force=args.force)
    except (ConfigError, DicomImportError) as exc:
        print(f"khe-vol import: {exc}", file=sys.stderr)
        return 2
    for problem in scan_problems:
        print(f"khe-vol import: {problem}", file=sys.stderr)
    for o in outcomes:
        who = f"{o.participant_id or '?'} {o.session_id or '?'}"
        print(f"{who}: study {o.study_instance_uid}: {o.status}"
              + (f" -> {o.nifti}" if o.nifti else "") + f" ({o.message})")
        for series, verdict in zip(o.series, o.verdicts):
            mark = "*" if series is o.chosen else ("+" if verdict.candidate else "-")
            print(f"    {mark} {series.label}: {verdict.reason}")
    failed = [o for o in outcomes if o.status == "failed"]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} studies converted; UID map {paths['uid_map']}, "
          f"report {paths['report']} (keep both outside the imaging folder)")
    if failed:
        print(f"khe-vol import: {len(failed)} study(ies) not converted (see above and {paths['report']})",
              file=sys.stderr)
    return 1 if failed or not outcomes else 0


def _cmd_tables(args):
    from khe_vol.files import read_records
    from khe_vol.report.provenance import run_provenance
    from khe_vol.tables import (
        RESPONSE_COLUMNS,
        VOLUME_COLUMNS,
        response_rows,
        volume_rows,
        write_table,
    )

    from khe_vol.discover import missing_visits

    records = read_records(args.records)
    out = Path(args.results_dir)
    config = json.loads(args.config_json) if args.config_json else None
    provenance = run_provenance(config, records, outputs=None)
    provenance.pop("Outputs")
    # Expected visits with no series (the config's sessions up to each participant's last): a row each.
    missing = missing_visits([(r["participant_id"], r["session_id"], r["month"]) for r in records],
                             config["sessions"]) if config else []
    write_table(out / "volumes.tsv", VOLUME_COLUMNS, volume_rows(records, missing), provenance)
    write_table(out / "response.tsv", RESPONSE_COLUMNS, response_rows(records, args.baseline_session, missing),
                provenance)
    print(f"wrote {out / 'volumes.tsv'} and {out / 'response.tsv'}")
    return 0


def _cmd_derivatives(args):
    from khe_vol.derivatives import write_derivatives
    from khe_vol.files import MASK_NAME, mask_beside, read_records

    pairs = [(read_records([rec_path])[0], mask_beside(rec_path)) for rec_path in args.records]
    edited = []
    if args.edited_dir:
        # <edited-dir>/<reader>/<participant>/<session>/mask.nii.gz, from `khe-vol qa final`.
        by_ids = {(r["participant_id"], r["session_id"]): r for r, _ in pairs}
        for path in sorted(Path(args.edited_dir).glob(f"*/*/*/{MASK_NAME}")):
            reader, pid, ses = path.parts[-4:-1]
            edited.append((by_ids[(pid, ses)], reader, path))
    write_derivatives(pairs, args.out_dir, edited)
    print(f"wrote {args.out_dir}")
    return 0


# ---- khe-vol qa: blinded reading (package, leak audit, reader app) -------------


def _cmd_qa_package(args):
    from khe_vol.nifti import SeriesError
    from khe_vol.qa import reader_dir
    from khe_vol.qa.key import default_key_path
    from khe_vol.qa.leaks import write_study_words
    from khe_vol.qa.package import PackageError, write_package

    try:
        reader_records = {}
        for reader, path in args.reader_record or []:
            reader_records.setdefault(reader, []).append(path)
        rows = write_package(args.results_dir, args.reader, args.seed, args.records, series_tsv=args.series,
                             overlays_tsv=args.overlays, source_root=args.source_root, key_path=args.key,
                             reader_records=reader_records, display={"radiological": not args.neurological},
                             reading_mode=args.reading_mode)
        # The arm and site names the reader app refuses in comments and the audit flags (one file for both).
        words = write_study_words(args.results_dir, args.allocation, args.arm or ())
    except (PackageError, SeriesError, OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
        print(f"khe-vol qa package: {exc}", file=sys.stderr)
        return 2
    for reader in args.reader:
        n_case = sum(1 for r in rows if r["reader"] == reader and r["status"] == "case")
        n_none = sum(1 for r in rows if r["reader"] == reader and r["status"] != "case")
        print(f"{reader}: {n_case} case(s) in {reader_dir(args.results_dir, reader)}"
              + (f"; {n_none} series not packaged (see the key)" if n_none else ""))
    for r in rows:
        if r["status"] != "case" and r["reader"] == args.reader[0]:
            print(f"  not packaged: {r['message']}", file=sys.stderr)
    print(f"unblinding key: {args.key or default_key_path(args.results_dir)} (keep it away from readers)")
    print(f"study words (arm and site names readers must not write): {words}")
    if args.seed < 2**32:
        print("note: a small seed can be guessed; use e.g. python -c 'import secrets; print(secrets.randbits(63))'",
              file=sys.stderr)
    return 0


def _cmd_qa_audit(args):
    """Exit 1 listing every leak, 0 with a summary when clean."""
    from khe_vol.files import atomic_write_text
    from khe_vol.qa.audit import audit

    try:
        leaks, problems, summary = audit(args.results_dir, args.allocation, args.db_dir, args.key)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"khe-vol qa audit: {exc}", file=sys.stderr)
        return 2
    lines = [str(leak) for leak in leaks] + list(problems)
    comments = sorted({leak.where for leak in leaks if leak.what == "comment"})
    if comments:
        lines.append(f"{len(comments)} reader comment(s) above unblind: hide each with `khe-vol qa redact --results-dir "
                     "R --reader <reader> --case <case> --revision <n> --reason ... --by <your name>` (kept in the "
                     "audit trail), then rerun")
    if not (leaks or problems):
        lines.append(f"clean: {summary['files']} file(s) and the pages of {len(summary['readers'])} reader(s) "
                     f"({', '.join(summary['readers'])}) checked against {summary['tokens']} forbidden token(s) "
                     f"({', '.join(summary['kinds'])}), date and visit patterns; the key is outside qa/")
    text = "".join(f"{line}\n" for line in lines)
    if args.findings:
        # Beside the workflow's output, never one: Snakemake deletes a failed rule's outputs, not this.
        atomic_write_text(args.findings, text)
    sys.stdout.write(text)
    if leaks or problems:
        where = f"; listed in {args.findings}" if args.findings else ""
        print(f"khe-vol qa audit: {len(leaks) + len(problems)} leak(s) found{where}", file=sys.stderr)
        return 1
    return 0


def _cmd_qa_redact(args):
    """Hide reader comments (one revision, or every revision of the case with a comment) from everyone."""
    from khe_vol.qa import default_db_path, store

    db = Path(args.db) if args.db else default_db_path(args.results_dir, args.reader)
    if args.revision is not None:
        revisions = [args.revision]
    else:
        revisions = [r["revision"] for r in store.read_history(db, args.case) if r["reader"] == args.reader
                     and r["comment"] and r["comment"] != store.REDACTED_COMMENT]
        if not revisions:
            print(f"khe-vol qa redact: {db}: case {args.case} of {args.reader} has no comment left to redact",
                  file=sys.stderr)
            return 2
    for revision in revisions:
        try:
            record = store.redact_comment(db, args.reader, args.case, revision, args.reason, args.by)
        except ValueError as exc:
            print(f"khe-vol qa redact: {exc}", file=sys.stderr)
            return 2
        print(f"redacted: {args.case} revision {revision} of {args.reader} (trail record {record['seq']}, comment "
              f"SHA-256 {record['old_value'] and json.loads(record['old_value'])['comment_sha256']})")
    print("readers, the audit and the reports now see "
          f"{store.REDACTED_COMMENT!r}; `khe-vol qa verify` checks the trail")
    return 0


def _cmd_qa_serve(args):
    from khe_vol.qa.service import ReadingService, ViewerMissing, serve

    try:
        service = ReadingService(args.results_dir, accounts_db=args.accounts, niivue_dir=args.niivue_dir,
                                 allocation_tsv=args.allocation, behind_tls=args.behind_tls,
                                 public_url=args.public_url, bind_host=args.host, access_log=sys.stderr)
    except (ViewerMissing, ValueError, OSError) as exc:
        print(f"khe-vol qa serve: {exc}", file=sys.stderr)
        return 2
    shown = args.public_url or f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    try:
        from khe_vol.qa.service import write_service_url

        write_service_url(service.accounts_db, shown)  # add-reader prints whole enrolment links from it
    except OSError as exc:
        print(f"khe-vol qa serve: could not note the service's URL ({exc}); add-reader then needs --public-url",
              file=sys.stderr)
    print(f"reading service: open {shown}/ and log in (accounts in {service.accounts_db}; "
          f"listening on {args.host}:{args.port}); Ctrl-C stops", flush=True)
    trusted = args.trusted_proxy if args.trusted_proxy is not None else ("127.0.0.1" if args.behind_tls else None)
    serve(service, args.host, args.port, threads=args.threads, trusted_proxy=trusted or None)
    return 0


def _accounts_path(args):
    from khe_vol.qa.accounts import default_accounts_path

    return args.accounts or default_accounts_path(args.results_dir)


def _enrolment_link(args, token):
    """The whole enrolment URL: ``--public-url``, else the URL ``khe-vol qa serve`` last served at."""
    from khe_vol.qa.service import read_service_url

    base = (args.public_url or read_service_url(_accounts_path(args)) or "").rstrip("/")
    if not base:
        print("note: the service's address is not known yet (no --public-url, and `khe-vol qa serve` has not run "
              "with these accounts): prefix the link with the address readers open, or give --public-url",
              file=sys.stderr)
    return f"{base}/enrol?token={token}"


def _cmd_qa_account(args):
    from khe_vol.qa import accounts

    if not (args.results_dir or args.accounts):
        print(f"khe-vol qa {args.qa_command}: give --results-dir (or --accounts)", file=sys.stderr)
        return 2
    path = _accounts_path(args)
    try:
        if args.qa_command == "add-reader":
            token = accounts.add_account(path, args.account, "adjudicator" if args.adjudicator else "reader")
        elif args.qa_command == "reset-reader":
            token = accounts.reset_account(path, args.account)
        else:
            accounts.set_enabled(path, args.account, args.qa_command == "enable-reader")
            token = None
    except (accounts.AccountError, ValueError) as exc:
        print(f"khe-vol qa {args.qa_command}: {exc}", file=sys.stderr)
        return 2
    if token is None:
        state = "enabled" if args.qa_command == "enable-reader" else "disabled (its sessions are over)"
        print(f"{args.account}: {state}")
    else:
        print(f"{args.account}: enrolment link (one use, valid {accounts.ENROLMENT_SECONDS // 86400} days; "
              "give it to the reader only, it is not shown again):")
        print(_enrolment_link(args, token))
    return 0


def _cmd_qa_disagreements(args):
    from khe_vol.qa.reads import write_disagreements

    adjudication = write_disagreements(args.results_dir, args.reader, args.baseline_session, args.key, args.records,
                                       args.out, args.overlays, args.overlay_dir)
    print(f"{len(adjudication)} series for adjudication")
    return 0


def _cmd_qa_final(args):
    from khe_vol.qa.reads import write_final

    finals, adjudication, edited = write_final(args.results_dir, args.reader, args.adjudicator, args.baseline_session,
                                               args.key, args.records, args.out, args.edited_dir, args.agreement)
    counts = {}
    for f in finals:
        counts[f["qa_status"]] = counts.get(f["qa_status"], 0) + 1
    print(", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
          + f"; {len(adjudication)} for adjudication; {len(edited)} edited mask(s)")
    return 0


def _cmd_qa_reader_times(args):
    from khe_vol.qa import default_db_path
    from khe_vol.qa.agreement import reader_time_rows, write_reader_times
    from khe_vol.qa.store import all_reads
    from khe_vol.report.provenance import table_provenance

    dbs = [default_db_path(args.results_dir, reader) for reader in args.reader]
    reads = [r for db in dbs for r in all_reads(db)]
    rows = reader_time_rows(reads, args.reader)
    write_reader_times(args.out, rows, table_provenance([db for db in dbs if db.is_file()]))
    for r in rows:
        print(f"{r['reader']}: {r['n_reads']} case(s) read, {r['n_timed']} timed")
    return 0


def _cmd_qa_reader_baseline(args):
    from khe_vol.qa.seeding import write_reader_baseline

    try:
        record = write_reader_baseline(args.db, args.reader, args.case_code, args.fingerprint, args.baseline_record,
                                       args.out_record, args.out_mask)
    except (ValueError, OSError) as exc:
        print(f"khe-vol qa reader-baseline: {exc}", file=sys.stderr)
        return 2
    print(f"{args.reader}'s seeded baseline of {record['participant_id']}: {record['volume_ml']:.3f} mL")
    return 0


def _cmd_qa_verify(args):
    from khe_vol.qa.verify import verify_results

    try:
        results = verify_results(args.results_dir)
    except FileNotFoundError as exc:
        print(f"khe-vol qa verify: {exc}", file=sys.stderr)
        return 2
    if not results:
        print(f"khe-vol qa verify: no reads database in {args.results_dir}/reads", file=sys.stderr)
        return 2
    bad = 0
    for path, v in results:
        if v.ok:
            print(f"{path}: ok: {v.records} trail record(s), {v.reads} read(s), {v.signed} signed; "
                  f"last SHA-256 {v.last_sha256}")
            continue
        bad += 1
        first = "" if v.first_altered is None else f"first altered record: seq {v.first_altered}; "
        print(f"{path}: FAILED: {first}{len(v.findings)} finding(s)", file=sys.stderr)
        for f in v.findings:
            print(f"  {f.message}", file=sys.stderr)
    if bad:
        print(f"khe-vol qa verify: {bad} of {len(results)} reads database(s) failed verification", file=sys.stderr)
        return 1
    print(f"khe-vol qa verify: {len(results)} reads database(s) verified")
    return 0


def _add_qa_parser(sub):
    from khe_vol.qa import READING_MODES

    qa = sub.add_parser("qa", help="blinded reading: build reader packages, audit them for leaks, serve the reader app")
    qa_sub = qa.add_subparsers(dest="qa_command", required=True)

    p = qa_sub.add_parser("package", help="build de-identified reader packages and the unblinding key")
    p.add_argument("--results-dir", required=True, help="packages go to <dir>/qa/<reader>/, the key to <dir>/blinding/")
    p.add_argument("--reader", action="append", required=True, help="reader id (R1, ADJ, ...); repeat for several")
    p.add_argument("--seed", type=int, required=True, help="secret seed of the case codes and the order")
    p.add_argument("--series", help="TSV with participant_id, session_id: package only these (adjudication)")
    p.add_argument("--overlays", help="TSV with participant_id, session_id, reader, verdict, volume_ml, mask: "
                   "other readers' reads, shown as 'Reader A', 'Reader B', ...")
    p.add_argument("--source-root", default=None, help="folder relative source_file paths are relative to (default: .)")
    p.add_argument("--key", default=None, help="unblinding key TSV to write (default <results-dir>/blinding/key.tsv; "
                   "never under qa/)")
    p.add_argument("--reader-record", nargs=2, action="append", metavar=("READER", "RECORD"),
                   help="a record.json for that reader's package only, replacing the same series' record "
                   "(follow-ups tracked from the reader's own seeded baseline); repeat")
    p.add_argument("--neurological", action="store_true",
                   help="show images in the neurological convention (patient's left on screen left) in the reader "
                   "app; default radiological (config reader_display: {radiological: false})")
    p.add_argument("--reading-mode", choices=READING_MODES, default="independent",
                   help="independent: one scan at a time, shuffled; longitudinal: a participant's scans grouped "
                   "as T1..Tn in time order, each follow-up shown beside T1")
    p.add_argument("--allocation", default=None, help="the allocation TSV (participant_id, arm [, site]): its arm "
                   "and site names go to <results-dir>/blinding/study_words.tsv, which the reader app (comments) "
                   "and the leak audit both forbid")
    p.add_argument("--arm", action="append", help="an arm name to forbid likewise (the workflow's arms); repeat")
    p.add_argument("records", nargs="+", help="record.json files of the workflow (mask.nii.gz beside each)")
    p.set_defaults(func=_cmd_qa_package)

    p = qa_sub.add_parser("reader-baseline", help="a reader's seeded baseline (record + mask) from their reads, "
                          "to track that reader's follow-ups from")
    p.add_argument("--db", required=True, help="the reader's reads database")
    p.add_argument("--reader", required=True, help="the reader's id")
    p.add_argument("--case-code", required=True, help="the reader's case code of the baseline")
    p.add_argument("--fingerprint", required=True, help="SHA-256 of the read's mask and clicks the run was planned on")
    p.add_argument("--baseline-record", required=True, help="the cohort's record.json of the baseline (needs_seed)")
    p.add_argument("--out-record", required=True, help="record.json of the reader's seeded baseline to write")
    p.add_argument("--out-mask", required=True, help="its mask to write")
    p.set_defaults(func=_cmd_qa_reader_baseline)

    p = qa_sub.add_parser("audit", help="check that nothing under qa/ identifies a participant, session, date or arm")
    p.add_argument("--results-dir", required=True, help="the workflow's results_dir (qa/, blinding/, reads/)")
    p.add_argument("--findings", default=None, help="also write what is printed to this file (the workflow's "
                   "qa_audit writes blinding/audit_findings.txt, kept when the rule fails)")
    p.add_argument("--allocation", help="TSV with participant_id, arm [, site]: its arm and site names are forbidden "
                   "too (the workflow's are already in <results-dir>/blinding/study_words.tsv)")
    p.add_argument("--db-dir", help="folder of the readers' <reader>.sqlite (default <results-dir>/reads)")
    p.add_argument("--key", action="append", help="unblinding key TSV (repeatable; default: every key in "
                   "<results-dir>/blinding/)")
    p.set_defaults(func=_cmd_qa_audit)

    p = qa_sub.add_parser("serve", help="serve the reading service: every reader and the adjudicator behind a login, "
                          "on waitress (loopback unless --host)")
    p.add_argument("--results-dir", required=True, help="the workflow's results_dir: packages under qa/, "
                   "reads and accounts under reads/")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback; a deployment "
                   "listens on loopback behind a TLS reverse proxy, see docs/nginx-khe-vol.conf)")
    p.add_argument("--port", type=int, default=8765, help="TCP port to listen on")
    p.add_argument("--behind-tls", action="store_true", help="readers reach the service over HTTPS (a TLS proxy): "
                   "session cookies are Secure")
    p.add_argument("--public-url", default=None, help="the URL readers open, e.g. https://reading.example.org "
                   "(its host name is accepted in the Host header)")
    p.add_argument("--trusted-proxy", default=None, help="address of the TLS proxy whose X-Forwarded-For and "
                   "X-Forwarded-Proto are believed, so the access log names each reader's address (default with "
                   "--behind-tls: 127.0.0.1; without it none; '' for none)")
    p.add_argument("--accounts", default=None, help="accounts database (default <results-dir>/reads/accounts.sqlite)")
    p.add_argument("--threads", type=int, default=SERVE_THREADS,
                   help=f"waitress worker threads (default {SERVE_THREADS}: requests run one at a time under the "
                        "GIL, so more threads only contend; further requests wait in waitress's queue)")
    p.add_argument("--niivue-dir", default=None, help="installed @niivue/niivue (default: node_modules of the repository)")
    p.add_argument("--allocation", help="another allocation TSV whose arm and site names comments may not carry "
                   "(not needed for the workflow's: `khe-vol qa package` wrote them to blinding/study_words.tsv, "
                   "which the service reads)")
    p.set_defaults(func=_cmd_qa_serve)

    p = qa_sub.add_parser("redact", help="hide a reader's comment that unblinds (the audit names it): readers, the "
                          "audit and reports see it removed; the trail keeps that it was there (its SHA-256), who "
                          "removed it and why")
    p.add_argument("--results-dir", required=True, help="the workflow's results_dir (reads under reads/)")
    p.add_argument("--reader", required=True, help="the reader whose read it is")
    p.add_argument("--case", required=True, help="the case code")
    p.add_argument("--revision", type=int, default=None, help="the revision (default: every revision of the case "
                   "with a comment)")
    p.add_argument("--reason", required=True, help="why, e.g. 'names an arm' (kept in the trail, never shown)")
    p.add_argument("--by", required=True, help="who in the core lab redacts it")
    p.add_argument("--db", default=None, help="the reads database (default <results-dir>/reads/<reader>.sqlite)")
    p.set_defaults(func=_cmd_qa_redact)

    p = qa_sub.add_parser("verify", help="recompute the audit trail's hash chain of every reads database and check "
                          "each read against it (exit 1 names the first altered record)")
    p.add_argument("--results-dir", required=True, help="checks <dir>/reads/*.sqlite (read-only)")
    p.set_defaults(func=_cmd_qa_verify)

    for name, text in (("add-reader", "create a reader (or --adjudicator) account; prints its one-time enrolment link"),
                       ("reset-reader", "drop an account's password and sessions; prints a new enrolment link"),
                       ("disable-reader", "disable an account (its sessions end at once)"),
                       ("enable-reader", "enable a disabled account again")):
        p = qa_sub.add_parser(name, help=text)
        p.add_argument("account", help="reader id, as in the reader package (R1, ADJ, ...)")
        p.add_argument("--results-dir", help="accounts are in <dir>/reads/accounts.sqlite")
        p.add_argument("--accounts", default=None, help="accounts database (instead of --results-dir)")
        if name in ("add-reader", "reset-reader"):
            p.add_argument("--public-url", default=None, help="prefix of the printed enrolment link "
                           "(e.g. https://reading.example.org; default: the URL `khe-vol qa serve` last served "
                           "these accounts at, its --public-url or http://host:port)")
        else:
            p.set_defaults(public_url=None)
        if name == "add-reader":
            p.add_argument("--adjudicator", action="store_true", help="the account is the adjudicator's")
        p.set_defaults(func=_cmd_qa_account)

    def reads_args(p):
        p.add_argument("--results-dir", required=True, help="reads are taken from <dir>/reads/<reader>.sqlite")
        p.add_argument("--reader", action="append", required=True, help="blinded reader id; repeat for two")
        p.add_argument("--baseline-session", required=True, help="ses-<label> of the month-0 session")
        p.add_argument("--key", action="append", required=True, help="unblinding key TSV; repeat for several")
        p.add_argument("records", nargs="+", help="record.json files of the workflow (mask.nii.gz beside each)")

    p = qa_sub.add_parser("disagreements", help="list series two readers disagree on, for the adjudicator")
    reads_args(p)
    p.add_argument("--out", required=True, help="TSV of series to adjudicate")
    p.add_argument("--overlays", required=True, help="TSV of the readers' reads of those series")
    p.add_argument("--overlay-dir", required=True, help="folder for the readers' edited masks shown as overlays")
    p.set_defaults(func=_cmd_qa_disagreements)

    p = qa_sub.add_parser("final", help="import every read: final volumes, edited masks, reader agreement")
    reads_args(p)
    p.add_argument("--adjudicator", default=None, help="the adjudicator's reader id (whose reads settle disagreements)")
    p.add_argument("--out", required=True, help="JSON list of final series records")
    p.add_argument("--edited-dir", required=True, help="folder of every reader's edited masks")
    p.add_argument("--agreement", required=True, help="qa_agreement.tsv (a .json dictionary goes beside it)")
    p.set_defaults(func=_cmd_qa_final)

    p = qa_sub.add_parser("reader-times", help="per reader: seconds per read (median, 90th percentile) and share "
                          "accepted without edit")
    p.add_argument("--results-dir", required=True, help="reads are taken from <dir>/reads/<reader>.sqlite")
    p.add_argument("--reader", action="append", required=True, help="reader id (readers and adjudicator); repeat")
    p.add_argument("--out", required=True, help="qa_reader_times.tsv (a .json dictionary goes beside it)")
    p.set_defaults(func=_cmd_qa_reader_times)


def _cmd_arms(args):
    from khe_vol.arms import allocation_mismatches, allocation_note, read_allocation, response_by_arm, write_response_by_arm
    from khe_vol.files import read_tsv
    from khe_vol.report.provenance import table_provenance

    participants = sorted({r["participant_id"] for r in read_tsv(args.volumes)})
    try:
        allocation, warnings = read_allocation(args.allocation, participants, args.arm)
        mismatches = allocation_mismatches(allocation, participants)
        result = response_by_arm(read_tsv(args.response), allocation, args.arm, args.month, args.primary_month,
                                 note=allocation_note(mismatches))
    except ValueError as exc:
        print(f"khe-vol arms: {exc}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"khe-vol arms: {warning}", file=sys.stderr)
    provenance = table_provenance([args.response, args.volumes, args.allocation])
    provenance["AllocationMismatches"] = [f"{pid} {what}" for pid, what in mismatches]
    write_response_by_arm(args.out, result, provenance)
    print(f"wrote {args.out} ({len(allocation)} allocated participants, intention to treat)")
    return 0


def _cmd_report_page(args):
    from khe_vol.files import atomic_write_text, read_tsv
    from khe_vol.report import pages

    rows = read_tsv(args.table)
    if args.kind == "response":
        page, summary = pages.response_page(rows, args.table), pages.categories_summary(rows)
    else:
        page, summary = pages.by_arm_page(rows, args.table), pages.by_arm_summary(rows)
    atomic_write_text(args.out, page)
    atomic_write_text(args.summary, summary)
    print(f"wrote {args.out} and {args.summary}")
    return 0


def _cmd_figures(args):
    from khe_vol.arms import read_allocation
    from khe_vol.files import atomic_write_bytes, read_tsv
    from khe_vol.report.figures import category_counts_png, spaghetti_png, waterfall_png

    response, volumes = read_tsv(args.response), read_tsv(args.volumes)
    allocation, arms = None, None
    if args.allocation:
        allocation, _ = read_allocation(args.allocation, sorted({r["participant_id"] for r in volumes}), args.arm)
        arms = args.arm
    out = Path(args.out_dir)
    atomic_write_bytes(out / "waterfall.png", waterfall_png(response, args.primary_month, allocation, arms))
    atomic_write_bytes(out / "spaghetti.png", spaghetti_png(volumes, allocation, arms))
    atomic_write_bytes(out / "category_counts.png",
                       category_counts_png(response, allocation, arms, args.primary_month))
    print(f"wrote {out}/waterfall.png, spaghetti.png, category_counts.png")
    return 0


def _cmd_montages(args):
    from khe_vol.files import atomic_write_bytes, mask_beside, read_records
    from khe_vol.nifti import SeriesError, load_image
    from khe_vol.report.montage import qc_montage_png, record_montage_text

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for rec_path in args.records:
        rec = read_records([rec_path])[0]
        name = f"{rec['participant_id']}_{rec['session_id']}.png"
        try:
            image = load_image(rec["source_file"], "series")
        except (SeriesError, TypeError):
            continue  # no image to show; the tables say why
        mask = None
        if rec["status"] == "ok":
            mask = load_image(mask_beside(rec_path), "mask").data != 0
        title, lines = record_montage_text(rec)
        atomic_write_bytes(out / name, qc_montage_png(image.data, image.affine, mask, title, lines))
        n += 1
    print(f"wrote {n} montage(s) to {out}")
    return 0


def _cmd_participant_page(args):
    from khe_vol.report.participant import write_participant_page

    problems = write_participant_page(args.participant, args.records, args.volumes, args.response, args.derivatives,
                                      args.out_html, args.out_pdf, args.final_records)
    for problem in problems:
        print(f"warning: {problem}")
    print(f"wrote {args.out_html} and {args.out_pdf}")
    return 0


def _cmd_workbook(args):
    from khe_vol.report.workbook import write_workbook

    tables = [(Path(p).stem, p) for p in args.tables]
    write_workbook(args.out, tables)
    print(f"wrote {args.out}")
    return 0


def _cmd_provenance(args):
    from khe_vol.files import atomic_write_text, read_records, sha256_file
    from khe_vol.report.provenance import run_provenance

    outputs = {}
    for path in args.output:
        p = Path(path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            outputs[str(f)] = sha256_file(f)
    config = json.loads(args.config_json) if args.config_json else None
    summary = run_provenance(config, read_records(args.records), outputs)
    atomic_write_text(args.out, json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out} ({len(outputs)} output files)")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="khe-vol", formatter_class=HelpFormatter,
        description="Volumetric MRI response assessment for kaposiform hemangioendothelioma trials. "
                    "Each command is one step of the workflow, usable on its own; `khe-vol run CONFIG` runs "
                    "them all on a study. `khe-vol COMMAND --help` says more.")
    parser.add_argument("--version", action="version", version=f"khe-vol {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="write the synthetic demo cohort (images, seeds, truth)")
    p.add_argument("out_dir", nargs="?", default="demo", help="folder to write the cohort into")
    p.add_argument("--participants", type=int, default=6, help="participants, each with baseline, m06 and m12")
    p.add_argument("--seed", type=int, default=0, help="random seed of the cohort")
    p.add_argument("--dicom", action="store_true",
                   help="write a small DICOM site export instead (site_export/, visits.tsv, seeds.tsv, study.yaml): "
                        "the README's worked example of khe-vol import and DICOM export")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("check", help="report every problem in a study folder at once, before a run")
    p.add_argument("config", nargs="*", help="workflow config YAML (several: a later file's top-level keys replace an earlier's, as with snakemake --configfile)")
    p.add_argument("--config-json", help="the config as JSON (used by the workflow)")
    p.add_argument("--report", help="also write the report to this file")
    p.add_argument("--headers-only", action="store_true", help="skip reading voxel data")
    p.add_argument("--no-fail", action="store_true", help="exit 0 even when problems are found")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "run", help="run the whole workflow on a study config, from any folder",
        description="Run khe-vol's Snakemake workflow on one study config. Paths in the config are relative "
                    "to its folder; Snakemake runs there (its .snakemake/ stays with the study). Any other "
                    "option is passed to Snakemake unchanged (e.g. --dry-run, --rerun-incomplete, "
                    "--config key=value).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", help="the study's config YAML (see khe_vol/schemas/config.schema.yaml)")
    p.add_argument("--cores", default=None,
                   help="cores to use (a number or 'all'); default: all, or what --profile sets")
    p.add_argument("--profile", default=None,
                   help="a Snakemake profile: 'slurm' (khe-vol's own, profiles/slurm) or a profile folder")
    p.add_argument("--report", nargs="?", const="", default=None, metavar="HTML",
                   help="after the run, write Snakemake's report (default <results_dir>/report.html)")
    p.set_defaults(func=_cmd_run, snakemake_args=[])

    p = sub.add_parser("series", help="validate, segment and measure one series")
    p.add_argument("--participant", required=True, help="sub-<label>")
    p.add_argument("--session", required=True, help="ses-<label>")
    p.add_argument("--month", default=None, help="months after randomisation ('n/a' for a session the config lacks)")
    p.add_argument("--image", default=None, help="the T2 series (NIfTI); none when discovery found no usable file")
    p.add_argument("--problem", default=None, help="a problem found by discovery")
    p.add_argument("--seed", type=float, nargs=3, metavar=("X", "Y", "Z"), help="seed in RAS+ mm")
    p.add_argument("--reader-mask", default=None, help="a reader's mask (NIfTI or Slicer .seg.nrrd): measured as is")
    p.add_argument("--reference-record", default=None,
                   help="record.json of the session to track from (a follow-up without seed or mask)")
    p.add_argument("--reference-mask", default=None, help="that session's mask")
    p.add_argument("--needs-seed", action="store_true",
                   help="a baseline with nothing to segment from: record that it waits for a reader's seed")
    p.add_argument("--segmentation-json", default=None, help="the config's segmentation parameters, as JSON")
    p.add_argument("--threads", type=int, default=1,
                   help="SimpleITK threads (1: series run side by side; results do not depend on it)")
    p.add_argument("--record", required=True, help="record.json to write (status, volume, flags, provenance)")
    p.add_argument("--mask", required=True, help="lesion mask to write (NIfTI, the series' grid; empty file if none)")
    p.set_defaults(func=_cmd_series)

    p = sub.add_parser("segment", help="segment a lesion from include / exclude clicks (RAS+ mm)")
    p.add_argument("--image", required=True, help="the T2 series (NIfTI)")
    p.add_argument("--include", action=_ClickAction, const="include", type=_ras_point, metavar="X,Y,Z",
                   help="a point of lesion, RAS+ mm; the first is the seed unless --start-mask is given (repeatable)")
    p.add_argument("--exclude", action=_ClickAction, const="exclude", type=_ras_point, metavar="X,Y,Z",
                   help="a point that is not lesion, RAS+ mm (repeatable; clicks apply in the order given)")
    p.add_argument("--start-mask", help="a mask to start from (a proposal or an earlier read) instead of the seed")
    p.add_argument("--box", type=_ras_box, metavar="X0,Y0,Z0,X1,Y1,Z1",
                   help="a box around the lesion, two opposite corners in RAS+ mm (its extent across the slices is "
                   "the slice range): the learned engine (LiteMedSAM) segments inside it; clicks then steer that mask")
    p.add_argument("--config", help="study config (its segmentation parameters are used)")
    p.add_argument("--out", required=True, help="mask to write: uint8 0/1 on the image grid")
    p.add_argument("--record", help="JSON record of the clicks and the result")
    p.set_defaults(func=_cmd_segment, clicks=[])

    p = sub.add_parser("import", help="convert a site's DICOM export into the imaging folder (de-identified T2 "
                       "NIfTI; UID map and report outside it)")
    p.add_argument("dicom_dir", help="folder of DICOM files (searched recursively; never modified)")
    p.add_argument("--out", required=True, help="the imaging folder (imaging_dir) to write sub-*/ses-*/anat/ into")
    p.add_argument("--visits", required=True, help="TSV: participant_id, session_id and one of study_instance_uid, "
                   "accession_number, study_date (+ patient_id); optional series_number")
    p.add_argument("--config", default=None, help="study config: dicom_series_rule and sessions")
    p.add_argument("--uid-map", default=None, help="UID map TSV (default <parent of --out>/dicom_uids.tsv; never "
                   "inside the imaging folder); import_report.tsv goes beside it")
    p.add_argument("--month-window", type=float, default=None, metavar="MONTHS",
                   help="match studies to sessions by months after the participant's first study (+-MONTHS); "
                   "the visits table then has participant_id and patient_id")
    p.add_argument("--force", action="store_true", help="replace a session's existing T2 that differs")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("tables", help="write volumes.tsv and response.tsv from series records")
    p.add_argument("--results-dir", required=True, help="folder to write volumes.tsv and response.tsv into")
    p.add_argument("--baseline-session", required=True, help="ses-<label> of the month-0 session")
    p.add_argument("--config-json", default=None, help="the run's config, recorded as provenance")
    p.add_argument("records", nargs="+", help="the series' record.json files")
    p.set_defaults(func=_cmd_tables)

    p = sub.add_parser("arms", help="response rates by arm (intention to treat) with CIs and tests")
    p.add_argument("--response", required=True, help="response.tsv")
    p.add_argument("--volumes", required=True, help="volumes.tsv (the participants with imaging)")
    p.add_argument("--allocation", required=True, help="TSV with participant_id, arm")
    p.add_argument("--arm", action="append", required=True, help="arm name, experimental first; repeat")
    p.add_argument("--month", type=int, action="append", required=True, help="follow-up month; repeat")
    p.add_argument("--primary-month", type=int, default=12, help="month of the primary endpoint")
    p.add_argument("--out", required=True, help="response_by_arm.tsv (a .json dictionary goes beside it)")
    p.set_defaults(func=_cmd_arms)

    p = sub.add_parser("figures", help="waterfall, spaghetti and category-count figures for the report")
    p.add_argument("--response", required=True, help="response.tsv")
    p.add_argument("--volumes", required=True, help="volumes.tsv")
    p.add_argument("--allocation", default=None, help="TSV with participant_id, arm: figures by arm")
    p.add_argument("--arm", action="append", default=None, help="arm name, experimental first; repeat")
    p.add_argument("--primary-month", type=int, default=12, help="month the waterfall shows")
    p.add_argument("--out-dir", required=True, help="folder for the PNG figures")
    p.set_defaults(func=_cmd_figures)

    p = sub.add_parser("report-page", help="a result table as an HTML page for the Snakemake report, and a front-page summary")
    p.add_argument("--kind", choices=["response", "response_by_arm"], required=True, help="which table it is")
    p.add_argument("--table", required=True, help="response.tsv or response_by_arm.tsv")
    p.add_argument("--out", required=True, help="the HTML page")
    p.add_argument("--summary", required=True, help="an HTML fragment the report's front page includes")
    p.set_defaults(func=_cmd_report_page)

    p = sub.add_parser("montages", help="a QC montage (slices with the mask contour) per series")
    p.add_argument("--out-dir", required=True, help="folder for the montages (one PNG per series)")
    p.add_argument("records", nargs="+", help="the series' record.json files")
    p.set_defaults(func=_cmd_montages)

    p = sub.add_parser("participant-page", help="one participant's page (HTML and PDF) for the unblinded core lab")
    p.add_argument("--participant", required=True, help="sub-<label>")
    p.add_argument("--volumes", required=True, help="volumes.tsv")
    p.add_argument("--response", required=True, help="response.tsv")
    p.add_argument("--derivatives", required=True, help="the derivatives folder (final masks)")
    p.add_argument("--final-records", help="the reads' final records (qa/final_records.json), to show the reads")
    p.add_argument("--out-html", required=True, help="the page to write (self-contained HTML)")
    p.add_argument("--out-pdf", required=True, help="the same page as a PDF, to print")
    p.add_argument("records", nargs="+", help="the participant's record.json files")
    p.set_defaults(func=_cmd_participant_page)

    p = sub.add_parser("workbook", help="one .xlsx with every table and the data dictionary")
    p.add_argument("--out", required=True, help="the .xlsx to write")
    p.add_argument("tables", nargs="+", help="TSV tables (their .json dictionaries beside them)")
    p.set_defaults(func=_cmd_workbook)

    p = sub.add_parser("provenance", help="write provenance.json: software, config, inputs and output checksums")
    p.add_argument("--out", required=True, help="provenance.json to write")
    p.add_argument("--config-json", default=None, help="the run's config, as JSON")
    p.add_argument("--output", action="append", default=[], help="an output file or folder to checksum; repeat")
    p.add_argument("records", nargs="+", help="the series' record.json files")
    p.set_defaults(func=_cmd_provenance)

    p = sub.add_parser("dicom-export", help="each series' final mask as DICOM SEG and its measurements as a "
                       "TID 1500 SR, on the source DICOM series named by the uid map")
    p.add_argument("--uid-map", required=True, help="dicom_uids.tsv written by khe-vol import")
    p.add_argument("--imaging-dir", required=True, help="the imaging folder the uid map's NIfTI paths are in")
    p.add_argument("--derivatives", required=True, help="the derivatives dataset (the final masks)")
    p.add_argument("--volumes", required=True, help="volumes.tsv")
    p.add_argument("--response", required=True, help="response.tsv")
    p.add_argument("--trial-json", default=None, help="config dicom_trial (sponsor, protocol, site) as JSON")
    p.add_argument("--out-dir", required=True, help="folder for sub-*/ses-*/{seg,sr}.dcm and export.tsv")
    p.add_argument("records", nargs="+", help="record.json files, or the reads' final records")
    p.set_defaults(func=_cmd_dicom_export)

    p = sub.add_parser("derivatives", help="write the BIDS derivatives dataset of masks")
    p.add_argument("--out-dir", required=True, help="the derivatives dataset folder to write")
    p.add_argument("--edited-dir", default=None, help="readers' edited masks (from khe-vol qa final)")
    p.add_argument("records", nargs="+", help="the series' record.json files, or the reads' final records")
    p.set_defaults(func=_cmd_derivatives)

    _add_qa_parser(sub)
    return _with_formatter(parser)


def _cmd_dicom_export(args):
    from khe_vol.dicom.export import write_dicom_export
    from khe_vol.files import read_records

    rows = write_dicom_export(read_records(args.records), args.volumes, args.response, args.uid_map,
                              args.imaging_dir, args.derivatives, args.out_dir,
                              trial=json.loads(args.trial_json) if args.trial_json else None)
    exported = [r for r in rows if r["status"] == "exported"]
    for row in rows:
        if row["status"] != "exported":
            print(f"not exported: {row['participant_id']} {row['session_id']}: {row['message']}")
    print(f"DICOM SEG + SR for {len(exported)} of {len(rows)} series in {args.out_dir}/ (export.tsv lists each)")
    return 0


def _joined_points(argv):
    """``--include -12.5,3,4`` as ``--include=-12.5,3,4``: argparse takes a value starting
    with '-' for an option, and RAS+ points are often negative."""
    out = []
    for token in argv:
        if out and out[-1] in ("--include", "--exclude") and token.startswith("-") and "," in token:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default (when it has one worth saying)."""

    def _get_help_string(self, action):
        text = action.help or ""
        worth_saying = not (action.default is None or action.default is False or action.default == []
                            or action.default is argparse.SUPPRESS)
        if ("%(default)" not in text and "default" not in text.lower() and worth_saying
                and (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))):
            text += " (default: %(default)s)"
        return text


def _subparser(parser, *names):
    """The subcommand parser reached by ``names`` (``"qa", "serve"``)."""
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _with_formatter(parser):
    """``parser`` and every subcommand parser under it, with :class:`HelpFormatter`."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _with_formatter(sub)
    return parser


def main(argv=None):
    argv = _joined_points(sys.argv[1:] if argv is None else list(argv))
    if argv[:1] == ["run"]:
        # Snakemake's own flags pass through `khe-vol run` unchanged.
        args, passthrough = build_parser().parse_known_args(argv)
        args.snakemake_args = [a for a in passthrough if a != "--"]
    else:
        args = build_parser().parse_args(argv)
    if args.command == "check" and not (args.config or args.config_json):
        _subparser(build_parser(), "check").error("a config file is needed: khe-vol check my_study.yaml")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
