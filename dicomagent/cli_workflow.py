"""``dicomagent worklist``, ``mpps``, ``outbox``, ``gpsps``, ``gppps``, ``gpwl``:
the workflow commands.

- ``worklist add PATH...`` / ``ls [--json]`` / ``rm ID...``: the Modality
  Worklist of a data dir (a running daemon sees changes at once: it reads
  the same database);
- ``mpps create HOST PORT FILE`` / ``mpps set HOST PORT UID FILE``: a
  modality's N-CREATE / N-SET (MPPS SCU), from a DICOM file or DICOM JSON;
  ``mpps ls [--json]``: the instances a daemon keeps;
- ``outbox ls [--json]``: forwarded messages still waiting, and why;
- ``gpsps add PATH...`` / ``ls`` / ``rm UID...``: schedule General Purpose
  Scheduled Procedure Steps (status SCHEDULED, on the General Purpose
  Worklist at once); ``gpsps action HOST PORT UID --status S
  --transaction-uid U``: the N-ACTION of a performer (GP-SPS SCU);
- ``gppps create HOST PORT FILE`` / ``set HOST PORT UID FILE`` / ``ls``:
  General Purpose Performed Procedure Steps (GP-PPS SCU, and what the
  daemon keeps);
- ``gpwl HOST PORT -k KEY=VALUE...``: query a General Purpose Worklist
  (``find --model gpwl``).

Exit codes as for every command (``dicomagent.cli``); ``worklist add``
exits 1 and adds nothing when any item is invalid.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pydicom

from dicomagent.cli import (EXIT_FAILURE_STATUS, EXIT_OK, EXIT_USAGE, _add_local_options,
                            _add_scu_options, _run, _scu_call, load_with_overrides)
from dicomagent.config import ConfigError


def add_parsers(commands) -> None:
    worklist = commands.add_parser("worklist", help="manage the Modality Worklist")
    actions = worklist.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add items from DICOM worklist files (.wl) or "
                                         "DICOM JSON")
    _add_local_options(add)
    add.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (recursive)")
    ls = actions.add_parser("ls", help="list the items")
    _add_local_options(ls)
    ls.add_argument("--json", action="store_true", help="print JSON (items as DICOM JSON)")
    rm = actions.add_parser("rm", help="remove items")
    _add_local_options(rm)
    rm.add_argument("ids", nargs="+", type=int, metavar="ID", help="item ids (see ls)")

    mpps = commands.add_parser("mpps", help="Modality Performed Procedure Step: send or list")
    actions = mpps.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="send N-CREATE (MPPS SCU)")
    _add_scu_options(create)
    create.add_argument("file", metavar="FILE", help="the data set: DICOM file or DICOM JSON")
    create.add_argument("--uid", metavar="UID",
                        help="Affected SOP Instance UID (default: a new one)")
    update = actions.add_parser("set", help="send N-SET (MPPS SCU)")
    _add_scu_options(update)
    update.add_argument("uid", metavar="UID", help="the instance's SOP Instance UID")
    update.add_argument("file", metavar="FILE", help="the modification list: DICOM or JSON")
    ls = actions.add_parser("ls", help="list the instances the daemon keeps")
    _add_local_options(ls)
    ls.add_argument("--json", action="store_true",
                    help="print a list of DICOM JSON objects (PS3.18 Annex F)")

    gpsps = commands.add_parser("gpsps", help="General Purpose Scheduled Procedure Steps")
    actions = gpsps.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="schedule steps from DICOM or DICOM JSON files")
    _add_local_options(add)
    add.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (recursive)")
    ls = actions.add_parser("ls", help="list the steps")
    _add_local_options(ls)
    ls.add_argument("--json", action="store_true", help="print JSON (steps as DICOM JSON)")
    rm = actions.add_parser("rm", help="remove steps")
    _add_local_options(rm)
    rm.add_argument("uids", nargs="+", metavar="UID", help="SOP Instance UIDs")
    action = actions.add_parser("action", help="send N-ACTION 'Request GP-SPS Status "
                                               "Modification' (GP-SPS SCU)")
    _add_scu_options(action)
    action.add_argument("uid", metavar="UID", help="the step's SOP Instance UID")
    action.add_argument("--status", required=True, type=str.upper,
                        choices=("IN PROGRESS", "SUSPENDED", "COMPLETED", "DISCONTINUED"),
                        help="the status asked for")
    action.add_argument("--transaction-uid", metavar="UID",
                        help="Transaction UID (new for IN PROGRESS; that one for the rest)")
    action.add_argument("--performer", action="append", default=[], metavar="NAME",
                        help="an Actual Human Performer's name (repeatable)")
    _add_meta_option(action)

    gppps = commands.add_parser("gppps", help="General Purpose Performed Procedure Steps")
    actions = gppps.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="send N-CREATE (GP-PPS SCU)")
    _add_scu_options(create)
    create.add_argument("file", metavar="FILE", help="the data set: DICOM file or DICOM JSON")
    create.add_argument("--uid", metavar="UID", help="Affected SOP Instance UID (default new)")
    _add_meta_option(create)
    update = actions.add_parser("set", help="send N-SET (GP-PPS SCU)")
    _add_scu_options(update)
    update.add_argument("uid", metavar="UID", help="the instance's SOP Instance UID")
    update.add_argument("file", metavar="FILE", help="the modification list: DICOM or JSON")
    _add_meta_option(update)
    ls = actions.add_parser("ls", help="list the instances the daemon keeps")
    _add_local_options(ls)
    ls.add_argument("--json", action="store_true", help="print DICOM JSON")

    gpwl = commands.add_parser("gpwl", help="General Purpose Worklist C-FIND SCU "
                                            "(find --model gpwl)")
    _add_scu_options(gpwl)
    gpwl.add_argument("-k", "--key", action="append", default=[], metavar="KEY=VALUE",
                      help="matching key (empty value: return key); keyword or gggg,eeee")
    gpwl.add_argument("--json", action="store_true", help="print DICOM JSON (PS3.18 F)")

    outbox = commands.add_parser("outbox", help="forwarded messages still waiting")
    actions = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="list them")
    _add_local_options(ls)
    ls.add_argument("--json", action="store_true", help="print JSON")


def _add_meta_option(parser) -> None:
    parser.add_argument("--meta", action="store_true",
                        help="propose the General Purpose Worklist Management Meta SOP Class "
                             "instead of the SOP class itself")


# --- reading data sets from files --------------------------------------------------------

def read_datasets(path: str) -> list[pydicom.Dataset]:
    """The data sets of a DICOM file, or of a DICOM JSON file (one object or a list)."""
    if path.lower().endswith(".json"):
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
        objects = content if isinstance(content, list) else [content]
        return [pydicom.Dataset.from_json(obj) for obj in objects]
    ds = pydicom.dcmread(path, force=True)
    if not len(ds):
        raise ValueError("not a DICOM file")
    return [ds]


def _files(paths: list[str]) -> list[str]:
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in sorted(os.walk(path)):
                found.extend(os.path.join(root, name) for name in sorted(names))
        else:
            found.append(path)
    return found


def _with_store(args, function) -> int:
    """``function(store, args)`` on the workflow store of the configured data dir, closed
    after; exit code 2 for a configuration error."""
    from dicomagent.archive.workflow import WorkflowStore
    try:
        config = load_with_overrides(args)
    except ConfigError as error:
        print(f"dicomagent: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    os.makedirs(config.agent.data_dir, exist_ok=True)
    store = WorkflowStore(os.path.join(config.agent.data_dir, "index.sqlite"))
    try:
        return function(store, args)
    finally:
        store.close()


def _print_rows(columns: list[str], rows: list[list]) -> None:
    widths = [min(40, max(len(c), *(len(str(r[i])) for r in rows))) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(v)[:40].ljust(w) for v, w in zip(row, widths)))


def _first(attrs: dict, key: str) -> str:
    from dicomagent.services.procedure import text_of
    return text_of(attrs, key)


# --- worklist --------------------------------------------------------------------------

def cmd_worklist(args) -> int:
    return _with_store(args, {"add": _worklist_add, "ls": _worklist_ls,
                              "rm": _worklist_rm}[args.action])


def _worklist_add(store, args) -> int:
    from dicomagent.archive.worklist import InvalidItem, split_item
    items, problems = [], []
    files = _files(args.paths)
    for path in files:
        try:
            for ds in read_datasets(path):
                items.extend((columns, attrs, path) for columns, attrs in split_item(ds))
        except (InvalidItem, ValueError, OSError, pydicom.errors.InvalidDicomError) as error:
            problems.append(f"{path}: {error}")
        except Exception as error:  # noqa: BLE001 - pydicom's many ways to fail on a file
            problems.append(f"{path}: cannot be read: {error}")
    for problem in problems:
        print(f"dicomagent worklist add: {problem}", file=sys.stderr)
    if problems:
        print(f"nothing added ({len(problems)} invalid file(s))", file=sys.stderr)
        return EXIT_FAILURE_STATUS
    ids = store.add_worklist_items(items)
    print(f"added {len(ids)} item(s) from {len(files)} file(s)"
          + (f": ids {ids[0]}-{ids[-1]}" if ids else ""))
    return EXIT_OK


def _worklist_ls(store, args) -> int:
    items = store.worklist_items()
    if args.json:
        print(json.dumps([{"id": item_id, "source": source, "dataset": attrs}
                          for item_id, attrs, source, _ in items], indent=1, ensure_ascii=False))
        return EXIT_OK
    if not items:
        print("the worklist is empty")
        return EXIT_OK
    rows = []
    for item_id, attrs, source, _ in items:
        step = ((attrs.get("00400100") or {}).get("Value") or [{}])[0]
        rows.append([item_id, _first(attrs, "00100010"), _first(attrs, "00100020"),
                     _first(attrs, "00080050"), _first(step, "00400002"),
                     _first(step, "00400003"), _first(step, "00080060"),
                     _first(step, "00400001"), _first(step, "00400009")])
    _print_rows(["ID", "PatientName", "PatientID", "Accession", "Date", "Time", "Modality",
                 "StationAET", "StepID"], rows)
    return EXIT_OK


def _worklist_rm(store, args) -> int:
    removed = store.remove_worklist_items(args.ids)
    print(f"removed {removed} item(s)")
    return EXIT_OK if removed == len(set(args.ids)) else EXIT_FAILURE_STATUS


# --- MPPS ------------------------------------------------------------------------------

def cmd_mpps(args) -> int:
    if args.action == "ls":
        return _with_store(args, _mpps_ls)
    try:
        ds = read_datasets(args.file)[0]
    except Exception as error:  # noqa: BLE001 - report any unreadable file
        print(f"dicomagent mpps {args.action}: {args.file}: {error}", file=sys.stderr)
        return EXIT_USAGE
    from dicomagent.services.mpps import MODALITY_PERFORMED_PROCEDURE_STEP as MPPS
    return _normalized(args, MPPS, ds, f"N-{args.action.upper()}")


def _normalized(args, sop_class_uid: str, ds: pydicom.Dataset, operation: str,
                action_type_id: int = 0) -> int:
    """Send one N-CREATE / N-SET / N-ACTION; print its status; the exit code."""
    from dicomagent.dimse.status import StatusCategory, category
    result, code = _run(_scu_call(_send_normalized(args, sop_class_uid, ds, operation,
                                                   action_type_id),
                                  f"{args.command} {args.action}"))
    if result is None:
        return code
    print(f"{operation} {result.sop_instance_uid}: status 0x{result.status:04X}"
          + (f" {result.error_comment}" if result.error_comment else ""))
    return EXIT_OK if category(result.status) in (StatusCategory.SUCCESS,
                                                  StatusCategory.WARNING) \
        else EXIT_FAILURE_STATUS


async def _send_normalized(args, sop_class_uid: str, ds: pydicom.Dataset, operation: str,
                           action_type_id: int):
    from dicomagent.association import associate
    from dicomagent.normalized import n_action, n_create, n_set
    from dicomagent.services.gp import GENERAL_PURPOSE_WORKLIST_META
    from dicomagent.ul.negotiation import ProposedContext
    from dicomagent.uids import UNCOMPRESSED_TRANSFER_SYNTAXES
    abstract_syntax = GENERAL_PURPOSE_WORKLIST_META if getattr(args, "meta", False) \
        else sop_class_uid
    association = await associate(args.host, args.port, args.aet, args.aec,
                                  [ProposedContext(abstract_syntax,
                                                   UNCOMPRESSED_TRANSFER_SYNTAXES)],
                                  artim_timeout=args.timeout, dimse_timeout=args.timeout,
                                  network_timeout=args.timeout)
    try:
        if operation == "N-CREATE":
            return await n_create(association, sop_class_uid, args.uid, ds, abstract_syntax)
        if operation == "N-SET":
            return await n_set(association, sop_class_uid, args.uid, ds, abstract_syntax)
        return await n_action(association, sop_class_uid, args.uid, action_type_id, ds,
                              abstract_syntax)
    finally:
        await association.release()


def _mpps_ls(store, args) -> int:
    from dicomagent.services.mpps import MODALITY_PERFORMED_PROCEDURE_STEP as MPPS
    instances = store.mpps_instances()
    if args.json:
        objects = []
        for instance in instances:
            obj = {"00080016": {"vr": "UI", "Value": [MPPS]},
                   "00080018": {"vr": "UI", "Value": [instance["sop_instance_uid"]]}}
            obj.update(instance["attrs"])
            objects.append(dict(sorted(obj.items())))
        print(json.dumps(objects, indent=1, ensure_ascii=False))
        return EXIT_OK
    if not instances:
        print("no MPPS instances")
        return EXIT_OK
    _print_rows(["SOPInstanceUID", "Status", "PatientName", "PatientID", "From", "Updated"],
                [[i["sop_instance_uid"], i["status"], _first(i["attrs"], "00100010"),
                  _first(i["attrs"], "00100020"), i["calling_ae_title"],
                  time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i["updated_at"]))]
                 for i in instances])
    return EXIT_OK


# --- outbox ----------------------------------------------------------------------------

def cmd_outbox(args) -> int:
    return _with_store(args, _outbox_ls)


def _outbox_ls(store, args) -> int:
    messages = store.outbox()
    if args.json:
        print(json.dumps([{"seq": m.seq, "peer": m.peer, "message": m.message,
                           "sop_class_uid": m.sop_class_uid,
                           "sop_instance_uid": m.sop_instance_uid, "state": m.state,
                           "attempts": m.attempts, "next_attempt": m.next_attempt,
                           "last_error": m.last_error, "created_at": m.created_at}
                          for m in messages], indent=1))
        return EXIT_OK
    if not messages:
        print("the outbox is empty")
        return EXIT_OK
    _print_rows(["Seq", "Peer", "Message", "SOPInstanceUID", "State", "Attempts", "NextAttempt",
                 "LastError"],
                [[m.seq, m.peer, m.message, m.sop_instance_uid, m.state, m.attempts,
                  time.strftime("%H:%M:%S", time.localtime(m.next_attempt))
                  if m.next_attempt else "now", m.last_error] for m in messages])
    return EXIT_OK


# --- General Purpose Scheduled / Performed Procedure Steps ------------------------------

def cmd_gpsps(args) -> int:
    if args.action == "action":
        return _gpsps_action(args)
    return _with_store(args, {"add": _gpsps_add, "ls": _gpsps_ls,
                              "rm": _gpsps_rm}[args.action])


def _gpsps_add(store, args) -> int:
    from pydicom.uid import generate_uid
    from dicomagent.archive.workflow import DuplicateInstance
    from dicomagent.services.gp import new_step
    steps, problems = [], []
    for path in _files(args.paths):
        try:
            for ds in read_datasets(path):
                uid = str(ds.get("SOPInstanceUID", "") or "") or generate_uid()
                columns, attrs = new_step(ds.to_json_dict(), uid)
                steps.append((uid, columns, attrs))
        except Exception as error:  # noqa: BLE001 - pydicom's many ways to fail on a file
            problems.append(f"{path}: cannot be read: {error}")
    for problem in problems:
        print(f"dicomagent gpsps add: {problem}", file=sys.stderr)
    if problems:
        print(f"nothing added ({len(problems)} invalid file(s))", file=sys.stderr)
        return EXIT_FAILURE_STATUS
    try:
        store.add_gpsps(steps)
    except DuplicateInstance as error:
        print(f"dicomagent gpsps add: step {error} exists already; nothing added",
              file=sys.stderr)
        return EXIT_FAILURE_STATUS
    for uid, _, _ in steps:
        print(uid)
    print(f"scheduled {len(steps)} step(s)", file=sys.stderr)
    return EXIT_OK


def _gpsps_ls(store, args) -> int:
    steps = store.gpsps_steps()
    if args.json:
        print(json.dumps([{"sop_instance_uid": s["sop_instance_uid"], "status": s["status"],
                           "transaction_uid": s["transaction_uid"],
                           "on_worklist": s["listed"], "dataset": s["attrs"]} for s in steps],
                         indent=1, ensure_ascii=False))
        return EXIT_OK
    if not steps:
        print("no General Purpose Scheduled Procedure Steps")
        return EXIT_OK
    _print_rows(["SOPInstanceUID", "Status", "OnWorklist", "PatientName", "PatientID",
                 "StepID", "Start"],
                [[s["sop_instance_uid"], s["status"], "yes" if s["listed"] else "no",
                  _first(s["attrs"], "00100010"), _first(s["attrs"], "00100020"),
                  _first(s["attrs"], "00400009"), _first(s["attrs"], "00404005")]
                 for s in steps])
    return EXIT_OK


def _gpsps_rm(store, args) -> int:
    removed = store.remove_gpsps(args.uids)
    print(f"removed {removed} step(s)")
    return EXIT_OK if removed == len(set(args.uids)) else EXIT_FAILURE_STATUS


def _gpsps_action(args) -> int:
    from dicomagent.services.gp import (GENERAL_PURPOSE_SCHEDULED_PROCEDURE_STEP,
                                        REQUEST_STATUS_MODIFICATION)
    ds = pydicom.Dataset()
    ds.GeneralPurposeScheduledProcedureStepStatus = args.status
    if args.transaction_uid:
        ds.TransactionUID = args.transaction_uid
    if args.performer:
        performers = []
        for name in args.performer:
            item = pydicom.Dataset()
            item.HumanPerformerName = name
            performers.append(item)
        ds.ActualHumanPerformersSequence = performers
    return _normalized(args, GENERAL_PURPOSE_SCHEDULED_PROCEDURE_STEP, ds, "N-ACTION",
                       REQUEST_STATUS_MODIFICATION)


def _gppps_ls(store, args) -> int:
    from dicomagent.services.gp import GENERAL_PURPOSE_PERFORMED_PROCEDURE_STEP as GPPPS
    instances = store.gppps_instances()
    if args.json:
        print(json.dumps([{"00080016": {"vr": "UI", "Value": [GPPPS]},
                           "00080018": {"vr": "UI", "Value": [i["sop_instance_uid"]]},
                           **i["attrs"]} for i in instances], indent=1, ensure_ascii=False))
        return EXIT_OK
    if not instances:
        print("no General Purpose Performed Procedure Steps")
        return EXIT_OK
    _print_rows(["SOPInstanceUID", "Status", "PatientName", "PatientID"],
                [[i["sop_instance_uid"], i["status"], _first(i["attrs"], "00100010"),
                  _first(i["attrs"], "00100020")] for i in instances])
    return EXIT_OK


def cmd_gppps(args) -> int:
    from dicomagent.services.gp import GENERAL_PURPOSE_PERFORMED_PROCEDURE_STEP as GPPPS
    if args.action == "ls":
        return _with_store(args, _gppps_ls)
    try:
        ds = read_datasets(args.file)[0]
    except Exception as error:  # noqa: BLE001 - report any unreadable file
        print(f"dicomagent gppps {args.action}: {args.file}: {error}", file=sys.stderr)
        return EXIT_USAGE
    return _normalized(args, GPPPS, ds, f"N-{args.action.upper()}")


def cmd_gpwl(args) -> int:
    from dicomagent.cli import cmd_find
    args.model, args.level, args.cancel_after, args.date_time_matching = "gpwl", None, None, False
    return cmd_find(args)


COMMANDS = {"worklist": cmd_worklist, "mpps": cmd_mpps, "outbox": cmd_outbox,
            "gpsps": cmd_gpsps, "gppps": cmd_gppps, "gpwl": cmd_gpwl}
