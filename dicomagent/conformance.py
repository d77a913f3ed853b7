"""PS3.2: dicomagent's own DICOM Conformance Statement, built from the code.

``statement(config)`` reads the service registry (``dicomagent.services``: SOP
classes, roles, transfer syntaxes, statuses, query keys, the associations the
agent opens), the configuration dataclasses (``dicomagent.config``: every key,
its default and its ``#:`` comment) and the implementation identifiers
(``dicomagent.uids``), and returns the statement as plain data; ``markdown``
and ``to_json`` render it. Nothing here lists a SOP class, a status or a key:
what is written as text is only what the code cannot say (the prose of the
implementation model, the communication profile, the standard's names of the
C-FIND extended negotiation bytes are in ``services.qr``).

The sections follow PS3.2 as the seed statement uses them: 1 Introduction,
2 Implementation Model, 3 AE Specifications, 4 Communication Profiles,
5 Extensions/Specializations/Privatizations, 6 Configuration, 7 Support of
Character Sets. The output has no date, host name or path: the checked-in
``conformance/CONFORMANCE.md`` is exactly ``dicomagent conformance-statement``.

References
----------
PS3.2 (Conformance), Annex A (template); PS3.7 Annex C (statuses), D.3.3
(extended negotiation); PS3.8 §9.3.3 (presentation context results).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import typing

import pydicom.charset
from pydicom.uid import UID

from dicomagent import __version__
from dicomagent import charsets  # noqa: F401 - pydicom learns the Defined Terms it lacks
from dicomagent import config as config_module
from dicomagent.dimse import status as dimse_status
from dicomagent.dimse.status import UNRECOGNIZED_OPERATION, StatusCategory, category
from dicomagent.services import ServiceClass, Status, registry
from dicomagent.uids import (APPLICATION_CONTEXT_NAME, IMPLEMENTATION_CLASS_UID,
                             IMPLEMENTATION_VERSION_NAME, UNCOMPRESSED_TRANSFER_SYNTAXES)

#: PS3.7 C.5: statuses the association itself answers with, whatever the service.
GENERAL_STATUSES = (
    Status(UNRECOGNIZED_OPERATION, "A request message the SOP class of its presentation "
                                   "context does not handle (e.g. N-GET on MPPS)"),
)


# --- the data model ------------------------------------------------------------------------

def statement(config: config_module.Config | None = None) -> dict:
    """The conformance statement as data (what ``to_json`` prints)."""
    config = config or config_module.Config()
    services = registry(config)
    order = tuple(config.agent.transfer_syntax_order)
    return {
        "product": "dicomagent",
        "version": __version__,
        "implementation": {
            "application_context_name": APPLICATION_CONTEXT_NAME,
            "implementation_class_uid": IMPLEMENTATION_CLASS_UID,
            "implementation_version_name": IMPLEMENTATION_VERSION_NAME,
        },
        "network_services": _network_services(services),
        "transfer_syntax_order": [_syntax(uid) for uid in order],
        "association_policies": {
            "maximum_length_received": config.agent.max_pdu_length,
            "maximum_pdu_send_length": config.agent.max_pdu_send_length,
            "max_associations": config.agent.max_associations,
            "asynchronous_operations_window": {"invoked": 1, "performed": 1},
            "check_called_aet": config.agent.check_called_aet,
            "require_known_calling_aet": config.agent.require_known_calling_aet,
            "timeouts": dataclasses.asdict(config.agent.timeouts),
        },
        "services": [_service(service, order) for service in services],
        "general_statuses": [_status(s) for s in GENERAL_STATUSES],
        "general_statuses_module": dimse_status.__name__,
        "configuration": configuration_keys(),
        # What pydicom decodes: its table, with the terms ``charsets`` added to it on import.
        "character_sets": sorted(name for name in pydicom.charset.python_encoding if name),
    }


def _syntax(uid: str) -> dict:
    return {"uid": uid, "name": UID(uid).name}


def _network_services(services: list[ServiceClass]) -> list[dict]:
    """Section 1 overview: every SOP class, whether the agent is user and/or provider."""
    rows = []
    for service in services:
        user = service.scu or any(i.role == "SCU" for i in service.initiates)
        provider = service.scp or any(i.role == "SCP" for i in service.initiates)
        for uid, name in service.sop_classes.items():
            rows.append({"service": service.name, "uid": uid, "name": name,
                         "user": user, "provider": provider})
    return rows


def accepted_transfer_syntaxes(service: ServiceClass, order: tuple[str, ...]) -> list[str]:
    """The transfer syntaxes accepted for the service, in the order negotiation prefers them.

    As ``ul.negotiation._answer_context`` chooses: the first of ``order`` the
    requestor proposed among those the service accepts, else one the service
    accepts outside the order.
    """
    acceptable = service.transfer_syntaxes or order
    return [ts for ts in order if ts in acceptable] + \
        [ts for ts in service.transfer_syntaxes if ts not in order]


def _extended_negotiation(service: ServiceClass) -> list[dict]:
    """Ask the service's answer function which bytes it accepts (all requested as 1)."""
    if service.extended_negotiation is None or not service.extended_negotiation_fields:
        return []
    answer = service.extended_negotiation(b"\x01" * len(service.extended_negotiation_fields))
    return [{"byte": index + 1, "name": name,
             "supported": bool(answer and len(answer) > index and answer[index] == 1)}
            for index, name in enumerate(service.extended_negotiation_fields)]


def _status(status: Status) -> dict:
    return {"code": f"{status.code:04X}", "category": status_category(status.code),
            "meaning": status.meaning}


def status_category(code: int) -> str:
    """PS3.7 Annex C category, with "Refused" for A7xx as PS3.4 names it."""
    if code & 0xFF00 == 0xA700:
        return "Refused"
    kind = category(code)
    return "Failed" if kind is StatusCategory.FAILURE else kind.value


def _service(service: ServiceClass, order: tuple[str, ...]) -> dict:
    acceptor = None
    if service.scp or service.scu:
        roles = (["SCP"] if service.scp else []) + (["SCU"] if service.scu else [])
        acceptor = {"roles": roles,
                    "transfer_syntaxes": accepted_transfer_syntaxes(service, order),
                    "extended_negotiation": _extended_negotiation(service),
                    "requests": [message.NAME for message in service.handlers]}
    return {
        "name": service.name,
        "reference": service.reference,
        "sop_classes": [{"uid": uid, "name": name} for uid, name in service.sop_classes.items()],
        "acceptor": acceptor,
        "statuses": [{"response": message.NAME.replace("-RQ", "-RSP"),
                      "module": service.handlers[message].__module__
                      if message in service.handlers else "",
                      "codes": [_status(s) for s in statuses]}
                     for message, statuses in service.statuses.items()],
        "query_keys": [{"name": group.name, "matching": group.matching,
                        "keys": [{"tag": f"({key.tag >> 16:04X},{key.tag & 0xFFFF:04X})",
                                  "keyword": key.keyword, "vr": key.vr,
                                  "in_step_sequence": bool(getattr(key, "in_step", False))}
                                 for key in group.keys]}
                       for group in service.query_keys],
        "initiates": [{"role": i.role, "command": i.command, "activity": i.activity,
                       "sop_classes": list(i.sop_classes or service.sop_classes),
                       "transfer_syntaxes": list(UNCOMPRESSED_TRANSFER_SYNTAXES),
                       "extended_negotiation": i.extended_negotiation}
                      for i in service.initiates],
    }


def _field_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the ``#:`` comment above the field in ``config.py``."""
    source = inspect.getsource(config_module)
    lines = source.splitlines()
    comments = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                text = []
                line = item.lineno - 2
                while line >= 0 and lines[line].strip().startswith("#:"):
                    text.insert(0, lines[line].strip()[2:].strip())
                    line -= 1
                comments[(node.name, item.target.id)] = " ".join(text)
    return comments


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def configuration_keys() -> list[dict]:
    """Every configuration key: TOML table, key, default (TOML), comment, from ``config.py``."""
    comments = _field_comments()
    rows: list[dict] = []

    def visit(cls, table: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                visit(hint, f"{table}.{f.name}" if table else f.name)
                continue
            if typing.get_origin(hint) is dict:
                visit(typing.get_args(hint)[1], f"{f.name}.NAME")
                continue
            if f.default is not dataclasses.MISSING:
                default = _toml(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = _toml(f.default_factory())
            else:
                default = "(required)"
            rows.append({"table": table, "key": f.name, "default": default,
                         "comment": comments.get((cls.__name__, f.name), "")})

    visit(config_module.Config, "")
    return rows


def to_json(data: dict) -> str:
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


# --- Markdown ------------------------------------------------------------------------------

def _table(header: list[str], rows: list[list]) -> list[str]:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return out + [""]


def _yes(flag: bool) -> str:
    return "Yes" if flag else "No"


def _command(command: str) -> str:
    return f"`dicomagent {command}`" if command else "the daemon (`dicomagent serve`)"


def markdown(data: dict) -> str:
    """The statement as GitHub Markdown."""
    out: list[str] = []
    add = out.append
    impl = data["implementation"]
    policies = data["association_policies"]
    services = data["services"]
    syntax_names = {ts["uid"]: ts["name"] for ts in data["transfer_syntax_order"]}

    def ts_name(uid: str) -> str:
        return syntax_names.get(uid) or UID(uid).name

    add(f"# dicomagent {data['version']} — DICOM Conformance Statement")
    add("")
    add("Generated by `dicomagent conformance-statement` from the service registry "
        "(`dicomagent/services/`), the configuration dataclasses (`dicomagent/config.py`) and "
        "`dicomagent/uids.py`; a test fails when this file is out of date. The layout is that "
        "of PS3.2 as the seed *DICOM Agent Conformance Statement* uses it. Everything below "
        "describes the embedded defaults (`dicomagent serve` with no configuration).")
    add("")

    # 1 ---------------------------------------------------------------------------------
    add("## 1 Introduction")
    add("")
    add("### 1.1 Overview: network services")
    add("")
    add("dicomagent is one Application Entity: a daemon that accepts associations, and the "
        "`dicomagent` commands that open them. It provides Standard Conformance to these SOP "
        "classes:")
    add("")
    out += _table(["SOP Class", "UID", "User of service (SCU)", "Provider of service (SCP)"],
                  [[r["name"], f"`{r['uid']}`", _yes(r["user"]), _yes(r["provider"])]
                   for r in data["network_services"]])
    add("### 1.2 Sources and abbreviations")
    add("")
    add("DICOM PS3.2, PS3.4, PS3.5, PS3.7, PS3.8 (current editions; the General Purpose "
        "Worklist classes as PS3.4 2003 defines them). AE Application Entity, DIMSE DICOM "
        "Message Service Element, PDU Protocol Data Unit, SCP Service Class Provider, SCU "
        "Service Class User, SOP Service-Object Pair, TS Transfer Syntax, UID Unique "
        "Identifier.")
    add("")

    # 2 ---------------------------------------------------------------------------------
    add("## 2 Implementation Model")
    add("")
    add("### 2.1 Application data flow")
    add("")
    add("```")
    add("remote AE ──association──▶ DICOMAGENT (dicomagent serve) ──▶ archive (files + index),")
    add("                                                              workflow store (worklists,")
    add("                                                              procedure steps, outbox)")
    add("DICOMAGENT (dicomagent serve / dicomagent COMMAND) ──association──▶ remote AE")
    add("```")
    add("")
    add("Real-world activities of the daemon as association-acceptor:")
    add("")
    for service in services:
        if service["acceptor"]:
            add(f"- **{service['name']}** ({service['reference']}): answers "
                f"{', '.join(service['acceptor']['requests'])}.")
    add("")
    add("Real-world activities in which the agent is association-requestor:")
    add("")
    for service in services:
        for i in service["initiates"]:
            add(f"- **{service['name']}**, {i['role']}, {_command(i['command'])}: {i['activity']}.")
    add("")
    add("### 2.2 Functional definition of the AE")
    add("")
    add("The daemon listens on one TCP port and serves any number of associations at once on "
        "one event loop. A C-STORE data set is written to a temporary file as it arrives, "
        "checked, flushed to stable storage and linked into the archive before the C-STORE-RSP "
        "is sent, and indexed just after (before the association is released). Queries are "
        "answered from the index (no file is opened). "
        "Worklist items, procedure steps, storage commitment requests and forwarded messages "
        "are records of a database in the data directory, so none is lost on a restart. Each "
        "`dicomagent` command opens one association (several for `store` when more than 128 "
        "presentation contexts are needed), performs its operation and releases it.")
    add("")
    add("### 2.3 Sequencing of real-world activities")
    add("")
    add("- C-STORE-RSP success is sent only once the object is on stable storage and indexed.")
    add("- Storage commitment: the N-ACTION is recorded before N-ACTION-RSP; the "
        "N-EVENT-REPORT follows on the same association while it is open, otherwise on a new "
        "one.")
    add("- MPPS: an N-SET is accepted only after the N-CREATE of its instance; forwarded "
        "messages reach each peer in the order they were accepted.")
    add("- GP-SPS / GP-PPS: a step is claimed (N-ACTION to IN PROGRESS) before a GP-PPS "
        "referencing it can be created.")
    add("")

    # 3 ---------------------------------------------------------------------------------
    add("## 3 AE Specifications")
    add("")
    add("### 3.1 DICOMAGENT")
    add("")
    add("#### 3.1.1 SOP classes")
    add("")
    rows = []
    for service in services:
        acceptor = service["acceptor"]
        for sop in service["sop_classes"]:
            user = [i["role"] for i in service["initiates"]]
            rows.append([sop["name"], f"`{sop['uid']}`",
                         ", ".join(acceptor["roles"]) if acceptor else "—",
                         ", ".join(sorted(set(user))) or "—"])
    out += _table(["SOP Class", "UID", "Roles as acceptor", "Roles as requestor"], rows)
    add("#### 3.1.2 Association policies")
    add("")
    add("##### 3.1.2.1 General")
    add("")
    add(f"Application context name: `{impl['application_context_name']}` (the only one DICOM "
        "defines; any other is rejected).")
    add("")
    max_received = policies["maximum_length_received"]
    add(f"Maximum Length Received announced: {max_received or 'unlimited (0)'} "
        f"(`agent.max_pdu_length`). P-DATA-TF PDUs sent to a peer that announces no maximum "
        f"are at most {policies['maximum_pdu_send_length']} bytes "
        f"(`agent.max_pdu_send_length`).")
    add("")
    add("##### 3.1.2.2 Number of associations")
    add("")
    limit = policies["max_associations"]
    add(f"As acceptor: {limit or 'no limit'} (`agent.max_associations`; when the limit is "
        "reached an A-ASSOCIATE-RQ is rejected transient, service-provider presentation, "
        "local limit exceeded). As requestor: one association at a time per command; the "
        "daemon opens one per C-MOVE destination, per commitment report and per forwarding "
        "peer.")
    add("")
    add("##### 3.1.2.3 Asynchronous nature")
    add("")
    window = policies["asynchronous_operations_window"]
    add(f"Not supported: an Asynchronous Operations Window proposal is answered with "
        f"{window['invoked']} invoked / {window['performed']} performed; one operation is "
        "outstanding at a time (a C-CANCEL-RQ is taken while C-FIND, C-MOVE or C-GET "
        "responses are going out).")
    add("")
    add("##### 3.1.2.4 Implementation identifying information")
    add("")
    out += _table(["", "Value"],
                  [["Implementation Class UID", f"`{impl['implementation_class_uid']}`"],
                   ["Implementation Version Name", f"`{impl['implementation_version_name']}`"]])

    add("#### 3.1.3 Association initiation policy")
    add("")
    add("Every command proposes the transfer syntaxes below, in this order, unless said "
        "otherwise; the role is the default (SCU) unless SCP/SCU Role Selection is noted. "
        "Maximum Length Received proposed: unlimited (0).")
    add("")
    number = 0
    for service in services:
        if not service["initiates"]:
            continue
        number += 1
        add(f"##### 3.1.3.{number} {service['name']}")
        add("")
        for i in service["initiates"]:
            add(f"- {_command(i['command'])}, {i['role']}: {i['activity']}.")
        add("")
        names = {sop["uid"]: sop["name"] for sop in service["sop_classes"]}
        rows = []
        for i in service["initiates"]:
            if len(i["sop_classes"]) > 4:
                abstract = f"the {len(i['sop_classes'])} {service['name']} SOP classes of 3.1.1"
            else:
                abstract = "<br>".join(f"{names.get(uid, uid)} `{uid}`"
                                       for uid in i["sop_classes"])
            rows.append([abstract, "<br>".join(ts_name(ts) for ts in i["transfer_syntaxes"]),
                         i["role"], i["extended_negotiation"] or "None", _command(i["command"])])
        out += _table(["Abstract Syntax", "Transfer Syntaxes", "Role", "Extended Negotiation",
                       "Opened by"], rows)

    add("#### 3.1.4 Association acceptance policy")
    add("")
    add("An A-ASSOCIATE-RQ is rejected (rejected-permanent, service-user) when its application "
        f"context name is not `{impl['application_context_name']}`; when its Called AE Title is "
        f"not ours and `agent.check_called_aet` is set (now {_toml(policies['check_called_aet'])}); "
        "when its Calling AE Title is not one of `[peers]` and "
        f"`agent.require_known_calling_aet` is set (now "
        f"{_toml(policies['require_known_calling_aet'])}).")
    add("")
    add("Presentation context acceptance criterion: any number of presentation contexts, "
        "each answered on its own (an abstract syntax may be proposed more than once): "
        "abstract-syntax-not-supported (3) for a SOP class not listed below; user-rejection "
        "(1) when no role we take was proposed; transfer-syntaxes-not-supported (4) when "
        "none of the proposed syntaxes is accepted; otherwise acceptance (0).")
    add("")
    for number, service in enumerate((s for s in services if s["acceptor"]), start=1):
        acceptor = service["acceptor"]
        add(f"##### 3.1.4.{number} {service['name']} ({service['reference']})")
        add("")
        add(f"Answers {', '.join(acceptor['requests'])}.")
        add("")
        extended = "None"
        if acceptor["extended_negotiation"]:
            extended = "; ".join(f"byte {e['byte']} {e['name']}: "
                                 f"{'accepted' if e['supported'] else 'not supported'}"
                                 for e in acceptor["extended_negotiation"])
        rows = [[sop["name"], f"`{sop['uid']}`",
                 "<br>".join(ts_name(ts) for ts in acceptor["transfer_syntaxes"]),
                 ", ".join(acceptor["roles"]), extended] for sop in service["sop_classes"]]
        out += _table(["Abstract Syntax", "UID", "Transfer Syntaxes (preferred first)", "Role",
                       "Extended Negotiation"], rows)
        if "SCU" in acceptor["roles"]:
            add("The SCU role is taken when the requestor proposes the SCP role through "
                "SCP/SCU Role Selection (C-STORE sub-operations of a C-GET).")
            add("")
        for table in service["statuses"]:
            add(f"{table['response']} status values:")
            add("")
            out += _table(["Code", "Status", "Meaning"],
                          [[c["code"], c["category"], c["meaning"]] for c in table["codes"]])
        for group in service["query_keys"]:
            add(f"Query keys — {group['name']}: {group['matching']}.")
            add("")
            out += _table(["Attribute", "Tag", "VR"],
                          [[(">" if k["in_step_sequence"] else "") + k["keyword"],
                            k["tag"], k["vr"]] for k in group["keys"]])
        if service["query_keys"]:
            add("Matching types: single value, universal, wild card (`*`, `?`), UID list, "
                "range (DA, TM, DT), sequence matching.")
            add("")
    add("Every service also answers with the PS3.7 C.5 status:")
    add("")
    out += _table(["Code", "Status", "Meaning"],
                  [[c["code"], c["category"], c["meaning"]] for c in data["general_statuses"]])

    add("#### 3.1.5 Transfer syntax selection policy")
    add("")
    add("Of the transfer syntaxes proposed in a presentation context, the first of this list "
        "(`agent.transfer_syntax_order`) that the SOP class accepts is chosen; the requestor's "
        "order is not considered:")
    add("")
    for index, ts in enumerate(data["transfer_syntax_order"], start=1):
        add(f"{index}. {ts['name']} `{ts['uid']}`")
    add("")
    add("With `storage.accept_compressed` the Storage SOP classes also accept every transfer "
        "syntax pydicom knows, after those of the list, in the requestor's order; objects are "
        "stored as received.")
    add("")

    # 4-7 -------------------------------------------------------------------------------
    add("## 4 Communication Profiles")
    add("")
    add("DICOM Upper Layer over TCP/IP (PS3.8), from the operating system's TCP/IP stack; "
        "any physical medium it supports. The daemon listens on `agent.host`:`agent.port`.")
    add("")
    add("## 5 Extensions / Specializations / Privatizations")
    add("")
    add("None: no private SOP classes, attributes or transfer syntaxes.")
    add("")
    add("## 6 Configuration")
    add("")
    add("One TOML file (`dicomagent serve -c FILE`); every key is optional. The AE title, "
        "port and presentation context policy are configured here; `[peers.NAME]` tables "
        "name the remote AEs (C-MOVE destinations, storage commitment requesters, MPPS "
        "forwarding peers).")
    add("")
    out += _table(["Table", "Key", "Default", "Meaning"],
                  [[f"`[{r['table']}]`", f"`{r['key']}`", f"`{r['default']}`", r["comment"]]
                   for r in data["configuration"]])
    add("## 7 Support of Character Sets")
    add("")
    add("Specific Character Set (0008,0005) values that can be decoded (pydicom): "
        + ", ".join(f"`{name}`" for name in data["character_sets"]) + ".")
    add("")
    add("Stored objects are kept as received, never converted. C-FIND identifiers are decoded "
        "with their own Specific Character Set and matched as text; responses carry the "
        "Specific Character Set of the stored instance or worklist item they come from.")
    return "\n".join(out).rstrip("\n") + "\n"
