"""The ``dicomagent`` command.

Subcommands: ``serve`` (the daemon), ``echo`` (Verification SCU), ``store``
(Storage SCU), ``find`` / ``move`` / ``get`` (Query/Retrieve SCU), ``commit``
(Storage Commitment SCU), ``ls``, ``import`` and ``retention`` (the local
archive), ``print`` (Print Management SCU); ``worklist``, ``mpps``, ``outbox``,
``gpsps``, ``gppps`` and ``gpwl`` live in ``cli_workflow``, ``probe`` in
``dicomagent.probe.cli``. Flags follow DCMTK's tools where DICOM people already
know them: ``HOST PORT`` positionals, ``-aet`` / ``-aec`` as aliases of ``--aet`` /
``--aec``.

Exit codes: 0 success; 1 the peer answered with a failure status; 2 usage or
configuration error; 3 no connection (refused, unreachable, timed out);
4 association rejected; 5 association aborted or no response in time.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dicomagent import __version__
from dicomagent.config import ConfigError, load_config, validate
from dicomagent.uids import (EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN,
                             IMPLICIT_VR_LITTLE_ENDIAN, UNCOMPRESSED_TRANSFER_SYNTAXES)

EXIT_OK, EXIT_FAILURE_STATUS, EXIT_USAGE, EXIT_NO_CONNECTION, EXIT_REJECTED, EXIT_ABORTED = range(6)

TRANSFER_SYNTAX_FLAGS = {
    "implicit": IMPLICIT_VR_LITTLE_ENDIAN,
    "explicit": EXPLICIT_VR_LITTLE_ENDIAN,
    "big": EXPLICIT_VR_BIG_ENDIAN,
}


def _add_local_options(parser: argparse.ArgumentParser) -> None:
    """``-c CONFIG`` and ``--data-dir DIR``: shared by every subcommand that works locally."""
    parser.add_argument("-c", "--config", metavar="CONFIG.toml",
                        help="TOML configuration file (default: embedded defaults)")
    parser.add_argument("--data-dir", metavar="DIR", help="data directory (overrides agent.data_dir)")


def _add_scu_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("host", help="peer host name or address")
    parser.add_argument("port", type=int, help="peer TCP port")
    parser.add_argument("--aet", "-aet", default="DICOMAGENT", metavar="AET",
                        help="calling AE title (default DICOMAGENT)")
    parser.add_argument("--aec", "-aec", default="ANY-SCP", metavar="AET",
                        help="called AE title (default ANY-SCP)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="connect, association and response timeout (default 30)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomagent", description="A DICOM network node: daemon and SCU tools.")
    parser.add_argument("--version", action="version", version=f"dicomagent {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    _add_local_options(serve)
    serve.add_argument("--aet", "-aet", metavar="AET", help="our AE title (agent.ae_title)")
    serve.add_argument("--host", help="address to listen on (agent.host)")
    serve.add_argument("--port", type=int, help="TCP port (agent.port)")

    echo = commands.add_parser("echo", help="Verification SCU: send C-ECHO")
    _add_scu_options(echo)
    echo.add_argument("--ts", action="append", choices=sorted(TRANSFER_SYNTAX_FLAGS),
                      help="propose only this transfer syntax (repeatable; default all three)")
    echo.add_argument("--repeat", type=int, default=1, metavar="N",
                      help="send N C-ECHO requests on the association")

    store = commands.add_parser("store", help="Storage SCU: send DICOM files and folders")
    _add_scu_options(store)
    store.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (recursive)")
    store.add_argument("--ts", action="append", choices=sorted(TRANSFER_SYNTAX_FLAGS),
                       help="propose only these transfer syntaxes, converting files as needed "
                            "(repeatable; default: each file's own)")
    store.add_argument("--no-progress", action="store_true", help="no progress bar")

    for name, text in (("find", "C-FIND SCU: query a peer"),
                       ("move", "C-MOVE SCU: have a peer send objects to an AE"),
                       ("get", "C-GET SCU: fetch objects from a peer")):
        sub = commands.add_parser(name, help=text)
        _add_scu_options(sub)
        sub.add_argument("-L", "--level", type=str.upper,
                         choices=("PATIENT", "STUDY", "SERIES", "IMAGE"),
                         help="Query/Retrieve Level")
        sub.add_argument("--model", default="study",
                         choices=("study", "patient") + (("mwl", "gpwl") if name == "find"
                                                         else ()),
                         help="information model: study or patient root (default study), "
                              "or for find a worklist: mwl (Modality), gpwl (General Purpose)")
        sub.add_argument("-k", "--key", action="append", default=[], metavar="KEY=VALUE",
                         help="matching key (empty value: return key); keyword or gggg,eeee")
        if name == "find":
            sub.add_argument("--json", action="store_true", help="print DICOM JSON (PS3.18 F)")
            sub.add_argument("--cancel-after", type=int, metavar="N",
                             help="send C-CANCEL after N matches")
            sub.add_argument("--date-time-matching", action="store_true",
                             help="negotiate combined date-time matching (a Date and its "
                                  "Time as one range, PS3.4 C.2.2.2.5.1)")
        if name == "move":
            sub.add_argument("--dest", "-aem", required=True, metavar="AET",
                             help="Move Destination AE title")
        if name == "get":
            sub.add_argument("--out", "-od", required=True, metavar="DIR",
                             help="where to write the received objects")

    commit = commands.add_parser("commit", help="Storage Commitment SCU: ask a peer to "
                                                "commit to instances")
    _add_scu_options(commit)
    commit.add_argument("items", nargs="+", metavar="PATH|UID",
                        help="DICOM files or folders, or SOP Instance UIDs of the local archive")
    commit.add_argument("--listen-port", type=int, metavar="PORT",
                        help="also accept the report on a new association on this port")
    commit.add_argument("-c", "--config", metavar="CONFIG.toml",
                        help="configuration (to find the local archive for UIDs)")
    commit.add_argument("--data-dir", metavar="DIR", help="local archive for UIDs")

    retention = commands.add_parser("retention", help="delete what the retention rule says "
                                                      "is too old")
    _add_local_options(retention)
    retention.add_argument("--dry-run", action="store_true", help="list, do not delete")
    retention.add_argument("--max-age-days", type=float, help="override retention.max_age_days")

    ls = commands.add_parser("ls", help="list what the archive holds")
    _add_local_options(ls)
    ls.add_argument("--level", choices=("study", "series", "instance"), default="study")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")

    _add_print_parser(commands)

    imp = commands.add_parser("import", help="add DICOM files from disk to the archive")
    _add_local_options(imp)
    imp.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (recursive)")

    statement = commands.add_parser("conformance-statement",
                                    help="print dicomagent's DICOM Conformance Statement (PS3.2)")
    statement.add_argument("--format", choices=("md", "json"), default="md",
                           help="Markdown (default) or JSON")

    from dicomagent import cli_workflow
    from dicomagent.probe import cli as probe_cli
    cli_workflow.add_parsers(commands)
    probe_cli.add_parser(commands, _add_scu_options)
    return parser


def _setup_logging(verbosity: int, default=logging.INFO) -> None:
    level = default if verbosity == 0 else (logging.INFO if verbosity == 1 else logging.DEBUG)
    # The logging HOWTO's "Optimization": no caller, thread or process look-up per record
    # (the daemon logs a line per association and per operation).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def load_with_overrides(args):
    config = load_config(args.config)
    agent = config.agent
    if getattr(args, "data_dir", None):
        agent.data_dir = args.data_dir
    if getattr(args, "aet", None):
        agent.ae_title = args.aet
    if getattr(args, "host", None):
        agent.host = args.host
    if getattr(args, "port", None) is not None:
        agent.port = args.port
    return validate(config)


def _run(coroutine):
    import uvloop
    return uvloop.run(coroutine)


def cmd_serve(args) -> int:
    from dicomagent.server import Agent
    try:
        config = load_with_overrides(args)
    except ConfigError as error:
        print(f"dicomagent: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(args.verbose)

    async def main():
        await Agent(config).serve_forever()

    try:
        _run(main())
    except OSError as error:
        logging.getLogger("dicomagent").error("cannot listen on %s:%d: %s", config.agent.host,
                                              config.agent.port, error.strerror or error)
        return EXIT_NO_CONNECTION
    return EXIT_OK


def cmd_echo(args) -> int:
    from dicomagent.association import (AssociationAborted, AssociationError,
                                        AssociationRejected, associate)
    from dicomagent.services.verification import echo
    from dicomagent.ul.negotiation import ProposedContext
    from dicomagent.uids import VERIFICATION

    _setup_logging(args.verbose, logging.WARNING)
    syntaxes = tuple(TRANSFER_SYNTAX_FLAGS[name] for name in args.ts) if args.ts \
        else UNCOMPRESSED_TRANSFER_SYNTAXES

    async def main() -> int:
        try:
            association = await associate(
                args.host, args.port, args.aet, args.aec,
                [ProposedContext(VERIFICATION, syntaxes)],
                artim_timeout=args.timeout, dimse_timeout=args.timeout,
                network_timeout=args.timeout)
        except AssociationRejected as error:
            print(f"dicomagent echo: {error}", file=sys.stderr)
            return EXIT_REJECTED
        except AssociationAborted as error:
            print(f"dicomagent echo: {error}", file=sys.stderr)
            return EXIT_ABORTED
        except AssociationError as error:
            print(f"dicomagent echo: {error}", file=sys.stderr)
            return EXIT_NO_CONNECTION
        try:
            if not association.contexts:
                print("dicomagent echo: the peer accepted no Verification presentation context",
                      file=sys.stderr)
                await association.release()
                return EXIT_REJECTED
            for _ in range(args.repeat):
                status = await echo(association)
                if status != 0:
                    print(f"dicomagent echo: C-ECHO-RSP status 0x{status:04X}", file=sys.stderr)
                    await association.release()
                    return EXIT_FAILURE_STATUS
            await association.release()
        except AssociationError as error:
            print(f"dicomagent echo: {error}", file=sys.stderr)
            return EXIT_ABORTED
        context = next(iter(association.contexts.values()))
        print(f"C-ECHO to {args.aec}@{args.host}:{args.port}: success "
              f"(transfer syntax {context.transfer_syntax})")
        return EXIT_OK

    return _run(main())


def cmd_store(args) -> int:
    from dicomagent.store import scan, store_files

    _setup_logging(args.verbose, logging.WARNING)
    files, skipped = scan(args.paths)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not files:
        print("dicomagent store: no DICOM files to send", file=sys.stderr)
        return EXIT_FAILURE_STATUS
    proposed = tuple(TRANSFER_SYNTAX_FLAGS[name] for name in args.ts) if args.ts else None
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(files), unit="obj", file=sys.stderr)

    def progress(local, status, comment):
        if bar is not None:
            bar.update(1)
        if status != 0:
            text = f"status 0x{status:04X}" if status >= 0 else "not sent"
            message = f"{local.path}: {text}{': ' + comment if comment else ''}"
            if bar is not None:
                bar.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr)

    report = _run(store_files(args.host, args.port, args.aet, args.aec, files, proposed,
                              progress, args.timeout))
    if bar is not None:
        bar.close()
    print(f"sent {report.sent}, warnings {report.warnings}, failed {report.failed}"
          f"{f', skipped {len(skipped)} non-DICOM' if skipped else ''}")
    return EXIT_OK if report.failed == 0 else EXIT_FAILURE_STATUS


def _open_archive(args):
    from dicomagent.archive import Archive, StorageSettings
    config = load_with_overrides(args)
    storage = config.storage
    return Archive(config.agent.data_dir, StorageSettings(
        fsync=storage.fsync, min_free_mb=storage.min_free_mb,
        on_duplicate=storage.on_duplicate, accept_mismatch=storage.accept_mismatch))


def cmd_ls(args) -> int:
    import json
    import os
    try:
        config = load_with_overrides(args)
    except ConfigError as error:
        print(f"dicomagent: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not os.path.exists(os.path.join(config.agent.data_dir, "index.sqlite")):
        print(f"dicomagent ls: no archive in {config.agent.data_dir}", file=sys.stderr)
        return EXIT_USAGE
    try:
        archive = _open_archive(args)
    except ConfigError as error:
        print(f"dicomagent: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        rows = archive.index.list(args.level)
    finally:
        archive.close()
    if args.json:
        print(json.dumps(rows, indent=1, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print(f"no {args.level} in {archive.data_dir}")
        return EXIT_OK
    columns = list(rows[0])
    widths = {c: min(64, max(len(c), *(len(str(r[c] or "")) for r in rows))) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c] or "")[:64].ljust(widths[c]) for c in columns))
    return EXIT_OK


def cmd_import(args) -> int:
    from dicomagent.store import scan
    try:
        archive = _open_archive(args)
    except ConfigError as error:
        print(f"dicomagent: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    files, skipped = scan(args.paths)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    stored = failed = 0
    try:
        for local in files:
            result = archive.import_file(local.path)
            if result.status in (0x0000, 0xB007):
                stored += 1
            else:
                failed += 1
                print(f"{local.path}: status 0x{result.status:04X} {result.comment}",
                      file=sys.stderr)
    finally:
        archive.close()
    print(f"imported {stored}, failed {failed}, skipped {len(skipped)}")
    return EXIT_OK if failed == 0 else EXIT_FAILURE_STATUS


def _identifier(args):
    from dicomagent.qrscu import parse_keys
    try:
        from dicomagent.qrscu import WORKLIST_MODELS
        return parse_keys(args.key, args.level, require_level=args.model not in WORKLIST_MODELS)
    except ValueError as error:
        print(f"dicomagent {args.command}: {error}", file=sys.stderr)
        return None


async def _scu_call(coroutine, command: str):
    """Run an SCU coroutine; map association failures to exit codes."""
    from dicomagent.association import AssociationAborted, AssociationError, AssociationRejected
    try:
        return await coroutine, EXIT_OK
    except AssociationRejected as error:
        print(f"dicomagent {command}: {error}", file=sys.stderr)
        return None, EXIT_REJECTED
    except AssociationAborted as error:
        print(f"dicomagent {command}: {error}", file=sys.stderr)
        return None, EXIT_ABORTED
    except AssociationError as error:
        print(f"dicomagent {command}: {error}", file=sys.stderr)
        return None, EXIT_NO_CONNECTION


def _print_table(datasets) -> None:
    columns: list = []
    for ds in datasets:
        for element in ds:
            if element.tag not in columns and element.VR != "SQ" and element.tag != 0x00080005:
                columns.append(element.tag)
    names = [pydicom_keyword(tag) for tag in columns]
    rows = [[_cell(ds.get(tag)) for tag in columns] for ds in datasets]
    widths = [min(40, max([len(n)] + [len(r[i]) for r in rows])) for i, n in enumerate(names)]
    print("  ".join(n.ljust(w) for n, w in zip(names, widths)))
    for row in rows:
        print("  ".join(c[:40].ljust(w) for c, w in zip(row, widths)))


def pydicom_keyword(tag) -> str:
    from pydicom.datadict import keyword_for_tag
    return keyword_for_tag(tag) or f"{tag:08X}"


def _cell(element) -> str:
    if element is None or element.value is None:
        return ""
    value = element.value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def cmd_find(args) -> int:
    import json
    from dicomagent.qrscu import find
    _setup_logging(args.verbose, logging.WARNING)
    identifier = _identifier(args)
    if identifier is None:
        return EXIT_USAGE
    result, code = _run(_scu_call(find(args.host, args.port, args.aet, args.aec, identifier,
                                       args.model, args.timeout,
                                       cancel_after=args.cancel_after,
                                       date_time_matching=args.date_time_matching), "find"))
    if result is None:
        return code
    if args.json:
        print(json.dumps([m.to_json_dict() for m in result.matches], indent=1,
                         ensure_ascii=False))
    elif result.matches:
        _print_table(result.matches)
    print(f"{len(result.matches)} matches, status 0x{result.status:04X}"
          f"{' ' + result.comment if result.comment else ''}", file=sys.stderr)
    return EXIT_OK if result.status in (0x0000, 0xFE00) else EXIT_FAILURE_STATUS


def _retrieve_report(result, what: str) -> int:
    print(f"{what}: status 0x{result.status:04X}{' ' + result.comment if result.comment else ''}"
          f"; completed {result.completed}, failed {result.failed}, warning {result.warning}")
    for uid in result.failed_uids:
        print(f"failed: {uid}", file=sys.stderr)
    return EXIT_OK if result.status in (0x0000, 0xFE00) else EXIT_FAILURE_STATUS


def _progress_printer(what: str):
    def show(rsp):
        if sys.stderr.isatty():
            print(f"\r{what}: {rsp.NumberOfCompletedSuboperations or 0} completed, "
                  f"{rsp.NumberOfRemainingSuboperations or 0} remaining, "
                  f"{rsp.NumberOfFailedSuboperations or 0} failed", end="", file=sys.stderr)
    return show


def cmd_move(args) -> int:
    from dicomagent.qrscu import move
    _setup_logging(args.verbose, logging.WARNING)
    identifier = _identifier(args)
    if identifier is None:
        return EXIT_USAGE
    result, code = _run(_scu_call(move(args.host, args.port, args.aet, args.aec, args.dest,
                                       identifier, args.model, args.timeout,
                                       _progress_printer("C-MOVE")), "move"))
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return code if result is None else _retrieve_report(result, "C-MOVE")


def cmd_get(args) -> int:
    from dicomagent.qrscu import get
    _setup_logging(args.verbose, logging.WARNING)
    identifier = _identifier(args)
    if identifier is None:
        return EXIT_USAGE
    result, code = _run(_scu_call(get(args.host, args.port, args.aet, args.aec, args.out,
                                      identifier, args.model, args.timeout,
                                      _progress_printer("C-GET")), "get"))
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return code if result is None else _retrieve_report(result, "C-GET")


def _commit_references(args) -> list[tuple[str, str]] | None:
    """(SOP Class, SOP Instance) of each PATH (file or folder) or UID (looked up locally)."""
    import os
    import sqlite3
    from dicomagent.store import scan
    references = []
    uids = [item for item in args.items if not os.path.exists(item)]
    files, skipped = scan([item for item in args.items if os.path.exists(item)])
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    references += [(f.sop_class_uid, f.sop_instance_uid) for f in files]
    if uids:
        config = load_with_overrides(args)
        index = os.path.join(config.agent.data_dir, "index.sqlite")
        if not os.path.exists(index):
            print(f"dicomagent commit: {', '.join(uids)}: no such file, and no archive in "
                  f"{config.agent.data_dir} to look UIDs up", file=sys.stderr)
            return None
        db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
        try:
            for uid in uids:
                row = db.execute("SELECT SOPClassUID FROM instances WHERE SOPInstanceUID = ?",
                                 (uid,)).fetchone()
                if row is None:
                    print(f"dicomagent commit: {uid}: not a file, nor in the archive",
                          file=sys.stderr)
                    return None
                references.append((row[0], uid))
        finally:
            db.close()
    return references


def cmd_commit(args) -> int:
    from dicomagent.commit import commit
    _setup_logging(args.verbose, logging.WARNING)
    try:
        references = _commit_references(args)
    except ConfigError as error:
        print(f"dicomagent: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not references:
        return EXIT_USAGE
    result, code = _run(_scu_call(commit(args.host, args.port, args.aet, args.aec, references,
                                         args.timeout, args.listen_port), "commit"))
    if result is None:
        return code
    if result.status != 0:
        print(f"dicomagent commit: N-ACTION-RSP status 0x{result.status:04X}", file=sys.stderr)
        return EXIT_FAILURE_STATUS
    for sop_class, sop_instance in result.committed:
        print(f"committed {sop_instance}")
    for sop_class, sop_instance, reason in result.failed:
        print(f"failed    {sop_instance} (Failure Reason 0x{reason:04X})")
    print(f"transaction {result.transaction_uid}: {len(result.committed)} committed, "
          f"{len(result.failed)} failed (report on the {result.delivered_on})", file=sys.stderr)
    return EXIT_OK if not result.failed else EXIT_FAILURE_STATUS


def cmd_retention(args) -> int:
    from dicomagent.retention import apply_retention
    try:
        config = load_with_overrides(args)
    except ConfigError as error:
        print(f"dicomagent: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.max_age_days is not None:
        config.retention.max_age_days = args.max_age_days
    if not config.retention.max_age_days:
        print("dicomagent retention: no rule (retention.max_age_days is 0)", file=sys.stderr)
        return EXIT_OK
    archive = _open_archive(args)
    try:
        uids = apply_retention(archive, config.retention, dry_run=args.dry_run)
    finally:
        archive.close()
    for uid in uids:
        print(uid)
    print(f"{'would delete' if args.dry_run else 'deleted'} {len(uids)} instances",
          file=sys.stderr)
    return EXIT_OK


def _add_print_parser(commands) -> None:
    """``dicomagent print PRINTER PATH|UID...``: Basic Grayscale Print Management SCU."""
    sub = commands.add_parser("print", help="Print Management SCU: print images on a DICOM "
                                            "printer ([peers.NAME] and [print.NAME])")
    _add_local_options(sub)
    sub.add_argument("printer", metavar="PRINTER", help="name of a [peers.NAME] entry")
    sub.add_argument("items", nargs="+", metavar="PATH|UID",
                     help="DICOM files or folders, or SOP Instance UIDs of the local archive")
    sub.add_argument("--layout", default="1,1", metavar="C,R",
                     help="image boxes per film, columns,rows (STANDARD\\C,R; default 1,1)")
    sub.add_argument("--copies", type=int, metavar="N", help="Number of Copies")
    sub.add_argument("--film-size", metavar="ID", help="Film Size ID, e.g. 14INX17IN")
    sub.add_argument("--orientation", type=str.upper, choices=("PORTRAIT", "LANDSCAPE"),
                     help="Film Orientation")
    sub.add_argument("--annotation", metavar="TEXT", help="text for the annotation box")
    sub.add_argument("--bits", type=int, choices=(8, 12), help="bits per printed pixel")
    sub.add_argument("--presentation-lut", metavar="SHAPE",
                     help="Presentation LUT Shape (IDENTITY, LIN OD) or 'none'")
    sub.add_argument("--gsps", metavar="FILE",
                     help="Grayscale Softcopy Presentation State to apply to the images")
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any [print.NAME] key for this job (repeatable)")
    sub.add_argument("--aet", "-aet", metavar="AET", help="calling AE title (agent.ae_title)")
    sub.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                     help="connect, association and response timeout (default 30)")
    sub.add_argument("--no-progress", action="store_true", help="no progress bar")


def _print_settings(args, config):
    """The printer's [print.NAME] table with this job's flags applied (ConfigError if wrong)."""
    import dataclasses
    from dicomagent.config import PrintSettings, check_print_settings
    settings = dataclasses.replace(config.print.get(args.printer, PrintSettings()))
    types = {f.name: f.type for f in dataclasses.fields(PrintSettings)}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in types:
            raise ConfigError(f"--set {key}: unknown key (known: {', '.join(sorted(types))})")
        try:
            setattr(settings, key, int(value) if types[key] in ("int", int) else value)
        except ValueError:
            raise ConfigError(f"--set {key}: expected an integer, got {value!r}") from None
    for flag, key in (("copies", "number_of_copies"), ("film_size", "film_size_id"),
                      ("orientation", "film_orientation"), ("bits", "bits_stored")):
        if getattr(args, flag) is not None:
            setattr(settings, key, getattr(args, flag))
    if args.presentation_lut is not None:
        shape = args.presentation_lut.upper()
        settings.presentation_lut_shape = "" if shape == "NONE" else shape
    check_print_settings(settings, f"print.{args.printer}")
    return settings


def cmd_print(args) -> int:
    import re
    import pydicom
    from dicomagent.printscu import PrintFailed, file_renderer, find_images, print_images
    _setup_logging(args.verbose, logging.ERROR)
    layout = re.fullmatch(r"(\d+),(\d+)", args.layout)
    if layout is None or 0 in (int(layout.group(1)), int(layout.group(2))):
        print(f"dicomagent print: --layout C,R with C and R at least 1, not {args.layout!r}",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_with_overrides(argparse.Namespace(config=args.config,
                                                        data_dir=args.data_dir))
        if args.printer not in config.peers:
            raise ConfigError(f"no [peers.{args.printer}] in "
                              f"{args.config or 'the embedded defaults'}")
        settings = _print_settings(args, config)
    except ConfigError as error:
        print(f"dicomagent: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    paths, problems = find_images(args.items, config.agent.data_dir)
    for problem in problems:
        print(f"dicomagent print: {problem}", file=sys.stderr)
    if problems or not paths:
        print("dicomagent print: nothing printed" if problems else
              "dicomagent print: no DICOM files to print", file=sys.stderr)
        return EXIT_USAGE
    gsps = None
    if args.gsps:
        try:
            gsps = pydicom.dcmread(args.gsps)
        except (OSError, pydicom.errors.InvalidDicomError) as error:
            print(f"dicomagent print: {args.gsps}: {error}", file=sys.stderr)
            return EXIT_USAGE
    peer = config.peers[args.printer]
    columns, rows = int(layout.group(1)), int(layout.group(2))
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(paths), unit="image", file=sys.stderr)

    def progress(result) -> None:
        if bar is not None:
            bar.update(result.images - bar.n)

    images = [file_renderer(path, settings.bits_stored, gsps) for path in paths]

    async def job():
        try:
            return await print_images(peer.host, peer.port, args.aet or config.agent.ae_title,
                                      peer.ae_title, settings, images, (columns, rows),
                                      args.annotation, args.timeout, progress)
        except PrintFailed as error:
            return error

    result, code = _run(_scu_call(job(), "print"))
    if bar is not None:
        bar.close()
    if result is None:
        return code
    if isinstance(result, PrintFailed):
        print(f"dicomagent print: {result}", file=sys.stderr)
        return EXIT_FAILURE_STATUS
    for warning in result.warnings:
        print(f"dicomagent print: warning: {warning}", file=sys.stderr)
    print(f"printed {result.images} images on {result.films} films "
          f"({settings.film_size_id} {settings.film_orientation}, STANDARD\\{columns},{rows}, "
          f"{settings.number_of_copies} copies) on {args.printer} ({peer.ae_title}@{peer.host}:"
          f"{peer.port})")
    return EXIT_OK


def cmd_conformance_statement(args) -> int:
    """The statement of the embedded defaults: what ``conformance/CONFORMANCE.md`` holds."""
    from dicomagent import conformance
    data = conformance.statement()
    sys.stdout.write(conformance.to_json(data) if args.format == "json"
                     else conformance.markdown(data))
    return EXIT_OK


COMMANDS = {"conformance-statement": cmd_conformance_statement, "print": cmd_print, "commit": cmd_commit, "retention": cmd_retention, "find": cmd_find, "move": cmd_move, "get": cmd_get, "serve": cmd_serve, "echo": cmd_echo, "store": cmd_store, "ls": cmd_ls,
            "import": cmd_import}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dicomagent import cli_workflow
    from dicomagent.probe.cli import cmd_probe
    return {**COMMANDS, **cli_workflow.COMMANDS, "probe": cmd_probe}[args.command](args)
