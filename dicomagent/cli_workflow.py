"""``dicomagent worklist``, ``mpps`` and ``outbox``: the workflow commands.

- ``worklist add PATH...`` / ``ls [--json]`` / ``rm ID...``: the Modality
  Worklist of a data dir (a running daemon sees changes at once: it reads
  the same database);
- ``mpps create HOST PORT FILE`` / ``mpps set HOST PORT UID FILE``: a
  modality's N-CREATE / N-SET (MPPS SCU), from a DICOM file or DICOM JSON;
  ``mpps ls [--json]``: the instances a daemon keeps;
- ``outbox ls [--json]``: forwarded messages still waiting, and why.

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

    outbox = commands.add_parser("outbox", help="forwarded messages still waiting")
    actions = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="list them")
    _add_local_options(ls)
    ls.add_argument("--json", action="store_true", help="print JSON")


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


def _open_store(args):
    from dicomagent.archive.workflow import WorkflowStore
    config = load_with_overrides(args)
    os.makedirs(config.agent.data_dir, exist_ok=True)
    return WorkflowStore(os.path.join(config.agent.data_dir, "index.sqlite"))


def _print_rows(columns: list[str], rows: list[list]) -> None:
    widths = [min(40, max(len(c), *(len(str(r[i])) for r in rows))) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(v)[:40].ljust(w) for v, w in zip(row, widths)))


def _first(attrs: dict, key: str) -> str:
    value = (attrs.get(key) or {}).get("Value") or [""]
    first = value[0]
    return first.get("Alphabetic", "") if isinstance(first, dict) else str(first)


# --- worklist --------------------------------------------------------------------------

def cmd_worklist(args) -> int:
    try:
        store = _open_store(args)
    except ConfigError as error:
        print(f"dicomagent: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return {"add": _worklist_add, "ls": _worklist_ls, "rm": _worklist_rm}[args.action](
            store, args)
    finally:
        store.close()


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
        return _mpps_ls(args)
    try:
        ds = read_datasets(args.file)[0]
    except Exception as error:  # noqa: BLE001 - report any unreadable file
        print(f"dicomagent mpps {args.action}: {args.file}: {error}", file=sys.stderr)
        return EXIT_USAGE
    result, code = _run(_scu_call(_send_mpps(args, ds), f"mpps {args.action}"))
    if result is None:
        return code
    print(f"N-{args.action.upper()} {result.sop_instance_uid}: status 0x{result.status:04X}"
          + (f" {result.error_comment}" if result.error_comment else ""))
    from dicomagent.dimse.status import StatusCategory, category
    return EXIT_OK if category(result.status) in (StatusCategory.SUCCESS,
                                                  StatusCategory.WARNING) \
        else EXIT_FAILURE_STATUS


async def _send_mpps(args, ds: pydicom.Dataset):
    from dicomagent.association import associate
    from dicomagent.normalized import n_create, n_set
    from dicomagent.services.mpps import MODALITY_PERFORMED_PROCEDURE_STEP as MPPS
    from dicomagent.ul.negotiation import ProposedContext
    from dicomagent.uids import UNCOMPRESSED_TRANSFER_SYNTAXES
    association = await associate(args.host, args.port, args.aet, args.aec,
                                  [ProposedContext(MPPS, UNCOMPRESSED_TRANSFER_SYNTAXES)],
                                  artim_timeout=args.timeout, dimse_timeout=args.timeout,
                                  network_timeout=args.timeout)
    try:
        if args.action == "create":
            return await n_create(association, MPPS, args.uid, ds)
        return await n_set(association, MPPS, args.uid, ds)
    finally:
        await association.release()


def _mpps_ls(args) -> int:
    from dicomagent.services.mpps import MODALITY_PERFORMED_PROCEDURE_STEP as MPPS
    try:
        store = _open_store(args)
    except ConfigError as error:
        print(f"dicomagent: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        instances = store.mpps_instances()
    finally:
        store.close()
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
    try:
        store = _open_store(args)
    except ConfigError as error:
        print(f"dicomagent: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        messages = store.outbox()
    finally:
        store.close()
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


COMMANDS = {"worklist": cmd_worklist, "mpps": cmd_mpps, "outbox": cmd_outbox}
