"""Modality Worklist: DCMTK ``findscu -W`` against ``dicomagent serve``, side by side
with DCMTK ``wlmscpfs`` over the same items, and the ``dicomagent worklist`` commands.

The worklist items (``ITEMS`` below) are written as dump texts and turned into ``.wl``
files by DCMTK ``dump2dcm``; ``dicomagent worklist add`` loads them into the data dir
of a running daemon, and ``wlmscpfs`` serves the same files from its data-files path.
Every matching case (``CASES``) runs the same ``findscu -W`` query against both; the
responses DCMTK wrote (``findscu -X``) are compared as multisets of data sets (order
is free, PS3.4 K.4.1.3), Specific Character Set (0008,0005) aside, and the Scheduled
Procedure Step IDs returned must be the expected ones, so that two servers agreeing
on a wrong answer still fail.

One deliberate difference in what the two servers are given: ``wlmscpfs`` rejects
(as "incomplete") a worklist file whose Scheduled Procedure Step Sequence has more
than one item, and with ``-dfr`` it returns such a file as one response carrying
both steps, which PS3.4 K.6.1.2.2 forbids (one Scheduled Procedure Step per
response). The item with two steps is therefore given to ``wlmscpfs`` as two files,
one per step: the worklist entries the standard says that item is.

These tests never skip: a missing DCMTK binary fails them (``nodes.require_binary``).

References
----------
PS3.4 K.4.1.3 (C-FIND SCP behaviour for the worklist), K.6.1 (Modality Worklist
Information Model, keys of Table K.6-1), C.2.2.2 (matching: single value, universal,
wild card, range, combined date-time range C.2.2.2.5.1, sequence C.2.2.2.6,
multi-valued attributes C.2.2.2.1).
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from nodes import HOST, RunningNode, dicomagent_cmd, require_binary, run, start_listening

WLM_AE = "WLMSCP"
UID_ROOT = "1.2.826.0.1.3680043.8.498.4417."
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

# --- the worklist items ---------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One Scheduled Procedure Step (an item of (0040,0100))."""

    sps_id: str
    modality: str
    station_ae: str          # may be multi-valued: "AA32\\AA33"
    date: str
    time: str
    physician: str
    protocol_code: str | None = None


@dataclass(frozen=True)
class Item:
    name: str                # file name (without .wl)
    patient_name: str
    patient_id: str
    accession: str
    requested_procedure_id: str
    steps: tuple[Step, ...]
    charset: str | None = None
    procedure_code: str | None = None


ITEMS = (
    Item("wl1", "DOE^JOHN", "P001", "A001", "RP001",
         (Step("SPS001", "CT", "STN1", "20240110", "080000", "SMITH^ANNA", "PROTO-CT1"),),
         procedure_code="CTHEAD"),
    Item("wl2", "DOE^JANE", "P002", "A002", "RP002",
         (Step("SPS002", "MR", "AA32\\AA33", "20240110", "143000", "JONES^BOB"),),
         procedure_code="MRKNEE"),
    Item("wl3", "MÜLLER^JÜRGEN", "P003", "A003", "RP003",
         (Step("SPS003", "US", "STN2", "20240111", "091500", "SMITH^ANNA"),),
         charset="ISO_IR 100"),
    Item("wl4", "ROE^RICHARD", "P004", "A004", "RP004",
         (Step("SPS004A", "CT", "STN1", "20240112", "100000", "BROWN^CARL", "PROTO-CT2"),
          Step("SPS004B", "MR", "STN3", "20240113", "160000", "JONES^BOB")),
         procedure_code="MULTI"),
    Item("wl5", "SMITH^JOHN", "P005", "A005", "RP005",
         (Step("SPS005", "CT", "STN2", "20240111", "235959", "WHITE^DAN"),)),
)
ALL_STEPS = {step.sps_id for item in ITEMS for step in item.steps}


def item_dump(item: Item, steps: tuple[Step, ...], uid_index: int) -> str:
    """The dump2dcm text of a worklist item with the given steps."""
    lines = []
    if item.charset:
        lines.append(f"(0008,0005) CS [{item.charset}]")
    lines += [
        f"(0008,0050) SH [{item.accession}]",
        "(0008,0090) PN [REFERRING^DOC]",
        f"(0010,0010) PN [{item.patient_name}]",
        f"(0010,0020) LO [{item.patient_id}]",
        "(0010,0030) DA [19700101]",
        "(0010,0040) CS [O]",
        f"(0020,000d) UI [{UID_ROOT}{uid_index}]",
        f"(0032,1060) LO [Procedure of {item.patient_id}]",
    ]
    if item.procedure_code:
        lines += ["(0032,1064) SQ", "(fffe,e000) -",
                  f"(0008,0100) SH [{item.procedure_code}]",
                  "(0008,0102) SH [99WLTEST]",
                  f"(0008,0104) LO [Code {item.procedure_code}]",
                  "(fffe,e00d) -", "(fffe,e0dd) -"]
    lines += ["(0040,0100) SQ"]
    for step in steps:
        lines += ["(fffe,e000) -",
                  f"(0008,0060) CS [{step.modality}]",
                  f"(0040,0001) AE [{step.station_ae}]",
                  f"(0040,0002) DA [{step.date}]",
                  f"(0040,0003) TM [{step.time}]",
                  f"(0040,0006) PN [{step.physician}]",
                  f"(0040,0007) LO [Step {step.sps_id}]",
                  ]
        if step.protocol_code:
            lines += ["(0040,0008) SQ", "(fffe,e000) -",
                      f"(0008,0100) SH [{step.protocol_code}]",
                      "(0008,0102) SH [99WLTEST]",
                      f"(0008,0104) LO [Protocol {step.protocol_code}]",
                      "(fffe,e00d) -", "(fffe,e0dd) -"]
        lines += [f"(0040,0009) SH [{step.sps_id}]",
                  "(0040,0010) SH [STATION]",
                  "(0040,0011) SH [ROOM]",
                  "(fffe,e00d) -"]
    lines += ["(fffe,e0dd) -",
              f"(0040,1001) SH [{item.requested_procedure_id}]",
              "(0040,1003) SH [ROUTINE]"]
    return "\n".join(lines) + "\n"


def dump2dcm(text: str, encoding: str, target: Path) -> None:
    """Write ``text`` as a dump file and convert it into ``target`` with DCMTK."""
    dump = target.with_suffix(".dump")
    dump.write_bytes(text.encode(encoding))
    done = run([require_binary("dump2dcm"), "-q", "+te", "-g", str(dump), str(target)])
    assert done.returncode == 0 and target.is_file(), \
        f"dump2dcm {dump} failed:\n{done.stdout}{done.stderr}"
    dump.unlink()


def make_items(agent_dir: Path, wlm_dir: Path) -> None:
    """``agent_dir``: one .wl per item; ``wlm_dir``: one .wl per step (see the docstring)."""
    for index, item in enumerate(ITEMS, 1):
        encoding = "latin-1" if item.charset == "ISO_IR 100" else "ascii"
        dump2dcm(item_dump(item, item.steps, index), encoding, agent_dir / f"{item.name}.wl")
        for number, step in enumerate(item.steps, 1):
            dump2dcm(item_dump(item, (step,), index), encoding,
                     wlm_dir / f"{item.name}_{number}.wl")


# --- the servers ----------------------------------------------------------------------------


@dataclass
class Worklists:
    agent: RunningNode
    wlm: RunningNode
    work: Path
    items_dir: Path


def worklist_cli(*args: str, timeout: float = 30.0):
    return run(dicomagent_cmd("worklist", *args), timeout)


@pytest.fixture(scope="module")
def worklists(module_agent_factory, tmp_path_factory):
    work = tmp_path_factory.mktemp("worklist")
    items_dir = work / "items"
    items_dir.mkdir()
    wlm_db = work / "wlmdb"
    (wlm_db / WLM_AE).mkdir(parents=True)
    (wlm_db / WLM_AE / "lockfile").write_bytes(b"")
    make_items(items_dir, wlm_db / WLM_AE)

    agent = module_agent_factory()
    # Added while the daemon runs: it reads the same database as the CLI.
    done = worklist_cli("add", "--data-dir", str(agent.data_dir), str(items_dir))
    assert done.returncode == 0, done.stderr
    assert re.search(r"added 6 item\(s\)", done.stdout), done.stdout

    binary = require_binary("wlmscpfs")
    log_path = work / "wlmscpfs.log"
    # -csk: keep the files' Specific Character Set, so both servers' responses decode
    # the same way (it is ignored in the comparison anyway).
    cmd, process, port = start_listening(
        lambda p: [binary, "-csk", "-dfp", str(wlm_db), str(p)], None, log_path, work, DCMTK_ENV)
    wlm = RunningNode(HOST, port, WLM_AE, process, log_path, wlm_db, None, cmd)
    try:
        yield Worklists(agent, wlm, work, items_dir)
    finally:
        status = wlm.terminate(10.0)
        assert status in (0, -signal.SIGTERM), f"wlmscpfs exited {status}:\n{wlm.log()}"


# --- querying -------------------------------------------------------------------------------

SPS = "ScheduledProcedureStepSequence[0]"

#: The return keys of every query (each case adds or overrides matching keys).
RETURN_KEYS = (
    "PatientName", "PatientID", "AccessionNumber", "RequestedProcedureID",
    "StudyInstanceUID",
    f"{SPS}.ScheduledStationAETitle", f"{SPS}.ScheduledProcedureStepStartDate",
    f"{SPS}.ScheduledProcedureStepStartTime", f"{SPS}.Modality",
    f"{SPS}.ScheduledPerformingPhysicianName", f"{SPS}.ScheduledProcedureStepID",
)

_counter = iter(range(1, 1_000_000))


@dataclass
class FindResult:
    datasets: list[pydicom.Dataset]
    output: str
    returncode: int

    def sps_ids(self) -> list[str]:
        return [str(ds.ScheduledProcedureStepSequence[0].get("ScheduledProcedureStepID", ""))
                for ds in self.datasets]


def findscu(host: str, port: int, called: str, keys: list[str], out_root: Path) -> FindResult:
    """``findscu -W -v -X`` with ``-k`` for each key; the responses DCMTK wrote."""
    out_dir = out_root / f"rsp{next(_counter)}"
    out_dir.mkdir()
    cmd = [require_binary("findscu"), "-W", "-v", "-aec", called, "-X", "-od", str(out_dir)]
    for key in keys:
        cmd += ["-k", key]
    done = run([*cmd, host, str(port)], 30.0, env=DCMTK_ENV)
    output = done.stdout + done.stderr
    datasets = [pydicom.dcmread(path) for path in sorted(out_dir.glob("rsp*.dcm"))]
    return FindResult(datasets, output, done.returncode)


def canonical(ds: pydicom.Dataset) -> str:
    """A data set as sorted DICOM JSON, Specific Character Set and File Meta aside."""
    data = ds.to_json_dict()
    data.pop("00080005", None)
    for key in [k for k in data if k.startswith("0002")]:
        del data[key]
    return json.dumps(data, sort_keys=True, ensure_ascii=False)


def assert_success(result: FindResult, who: str) -> None:
    assert result.returncode == 0, f"findscu against {who} failed:\n{result.output}"
    # findscu -v: "Received Final Find Response (Success)"; one "Pending" per match.
    assert re.search(r"Final Find Response \(Success\)", result.output), result.output
    pending = len(re.findall(r"Received Find Response \d+ \(Pending\)", result.output))
    assert pending == len(result.datasets), (pending, len(result.datasets), result.output)


#: A case that wlmscpfs matches otherwise (a key it does not match on, or a reading
#: the standard leaves open): it is asked the same keys without their values, and its
#: responses for the expected steps are compared with ours.
WLM_MATCHES_OTHERWISE = "wlmscpfs-matches-otherwise"

#: (case id, keys added to RETURN_KEYS, the Scheduled Procedure Step IDs that match
#: [, WLM_MATCHES_OTHERWISE])
CASES = [
    ("universal", [], ALL_STEPS),
    # Scheduled Station AE Title: single value, multi-valued stored value, wild card.
    ("station-ae", [f"{SPS}.ScheduledStationAETitle=STN1"], {"SPS001", "SPS004A"}),
    ("station-ae-multi-first", [f"{SPS}.ScheduledStationAETitle=AA32"], {"SPS002"}),
    ("station-ae-multi-second", [f"{SPS}.ScheduledStationAETitle=AA33"], {"SPS002"}),
    # Wild card on an AE: PS3.4 C.2.2.2.4 allows * and ? for AE. wlmscpfs 3.6.7 matches
    # the Scheduled Station AE Title by value only (this query finds nothing there), so
    # its responses are compared only as the return keys of the expected steps.
    ("station-ae-wildcard", [f"{SPS}.ScheduledStationAETitle=STN*"],
     {"SPS001", "SPS003", "SPS004A", "SPS004B", "SPS005"}, WLM_MATCHES_OTHERWISE),
    # Scheduled Procedure Step Start Date: single value and ranges.
    ("date", [f"{SPS}.ScheduledProcedureStepStartDate=20240110"], {"SPS001", "SPS002"}),
    ("date-range", [f"{SPS}.ScheduledProcedureStepStartDate=20240110-20240111"],
     {"SPS001", "SPS002", "SPS003", "SPS005"}),
    ("date-from", [f"{SPS}.ScheduledProcedureStepStartDate=20240112-"],
     {"SPS004A", "SPS004B"}),
    ("date-until", [f"{SPS}.ScheduledProcedureStepStartDate=-20240110"],
     {"SPS001", "SPS002"}),
    # Scheduled Procedure Step Start Time alone: single value and range (inclusive).
    ("time", [f"{SPS}.ScheduledProcedureStepStartTime=080000"], {"SPS001"}),
    ("time-range", [f"{SPS}.ScheduledProcedureStepStartTime=080000-100000"],
     {"SPS001", "SPS003", "SPS004A"}),
    # Date and Time together: a single date with a single time.
    ("date-and-time", [f"{SPS}.ScheduledProcedureStepStartDate=20240110",
                       f"{SPS}.ScheduledProcedureStepStartTime=143000"], {"SPS002"}),
    # A single date with a time range: that day between the two times.
    ("date-time-range", [f"{SPS}.ScheduledProcedureStepStartDate=20240111",
                         f"{SPS}.ScheduledProcedureStepStartTime=090000-100000"], {"SPS003"}),
    # C.2.2.2.5.1 combined: 2024-01-10 12:00 until 2024-01-11 09:30. Matched apart, the
    # time range 1200-0930 would select nothing at all.
    ("combined-range", [f"{SPS}.ScheduledProcedureStepStartDate=20240110-20240111",
                        f"{SPS}.ScheduledProcedureStepStartTime=120000-093000"],
     {"SPS002", "SPS003"}),
    # Combined: from 2024-01-11 12:00 on.
    ("combined-open", [f"{SPS}.ScheduledProcedureStepStartDate=20240111-",
                       f"{SPS}.ScheduledProcedureStepStartTime=120000-"],
     {"SPS005", "SPS004A", "SPS004B"}),
    # Combined, a date range with a single time: read as the one date-time range
    # 2024-01-10 10:00 until 2024-01-12 10:00 ("as if a single DT value",
    # C.2.2.2.5.1). wlmscpfs 3.6.7 matches the two apart here (date in range AND time
    # exactly 10:00: only SPS004A); the standard's example has two ranges only, so
    # this case is not compared on matching.
    ("combined-single-time", [f"{SPS}.ScheduledProcedureStepStartDate=20240110-20240112",
                              f"{SPS}.ScheduledProcedureStepStartTime=100000"],
     {"SPS002", "SPS003", "SPS005", "SPS004A"}, WLM_MATCHES_OTHERWISE),
    # Times with minutes precision: 10:00 includes 10:00:00 (C.2.2.2.5).
    ("time-range-short", [f"{SPS}.ScheduledProcedureStepStartTime=0800-1000"],
     {"SPS001", "SPS003", "SPS004A"}),
    ("combined-short", [f"{SPS}.ScheduledProcedureStepStartDate=20240111-20240112",
                        f"{SPS}.ScheduledProcedureStepStartTime=0900-1000"],
     {"SPS003", "SPS005", "SPS004A"}),
    # Modality.
    ("modality", [f"{SPS}.Modality=MR"], {"SPS002", "SPS004B"}),
    ("modality-ct", [f"{SPS}.Modality=CT"], {"SPS001", "SPS004A", "SPS005"}),
    # Scheduled Performing Physician's Name, single value and wild card.
    ("physician", [f"{SPS}.ScheduledPerformingPhysicianName=SMITH^ANNA"],
     {"SPS001", "SPS003"}),
    ("physician-wildcard", [f"{SPS}.ScheduledPerformingPhysicianName=JON*"],
     {"SPS002", "SPS004B"}),
    # Patient's Name: single value, * and ? wild cards.
    ("patient-name", ["PatientName=DOE^JOHN"], {"SPS001"}),
    ("patient-name-star", ["PatientName=DOE^*"], {"SPS001", "SPS002"}),
    ("patient-name-question", ["PatientName=DOE^JA?E"], {"SPS002"}),
    ("patient-name-inner", ["PatientName=*^JOHN"], {"SPS001", "SPS005"}),
    ("patient-name-no-match", ["PatientName=NOBODY*"], set()),
    # Patient ID (one item with two steps: two entries).
    ("patient-id", ["PatientID=P004"], {"SPS004A", "SPS004B"}),
    ("accession", ["AccessionNumber=A003"], {"SPS003"}),
    ("requested-procedure-id", ["RequestedProcedureID=RP005"], {"SPS005"}),
    # Scheduled Procedure Step ID is an optional matching key (Table K.6-1, "O"):
    # wlmscpfs 3.6.7 does not match on it (it answers every item), which K.4.1.3 allows;
    # dicomagent does. Compared as the return keys of the expected step.
    ("sps-id", [f"{SPS}.ScheduledProcedureStepID=SPS004B"], {"SPS004B"}, WLM_MATCHES_OTHERWISE),
    # Several keys: all must match, in the same step (not one key per step).
    ("and", [f"{SPS}.Modality=CT", f"{SPS}.ScheduledStationAETitle=STN2"], {"SPS005"}),
    ("same-step", ["PatientID=P004", f"{SPS}.Modality=MR",
                   f"{SPS}.ScheduledStationAETitle=STN1"], set()),
    # Sequence-item return keys: Requested Procedure Code Sequence at the top, and the
    # Scheduled Protocol Code Sequence nested in the step, selected on the two steps
    # whose items hold both. (For items without them the two servers differ and the
    # standard leaves room: wlmscpfs omits the Requested Procedure Code Sequence and
    # returns the Scheduled Protocol Code Sequence with one item of empty keys,
    # dicomagent returns both with zero items; see test_response_values.)
    ("sequence-return-keys", ["RequestedProcedureCodeSequence[0].CodeValue",
                              "RequestedProcedureCodeSequence[0].CodingSchemeDesignator",
                              f"{SPS}.ScheduledProtocolCodeSequence[0].CodeValue",
                              f"{SPS}.ScheduledProtocolCodeSequence[0].CodeMeaning",
                              f"{SPS}.Modality=CT", f"{SPS}.ScheduledStationAETitle=STN1"],
     {"SPS001", "SPS004A"}),
]


@pytest.mark.parametrize("keys, expected, mode",
                         [(c[1], c[2], c[3] if len(c) > 3 else None) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_findscu_side_by_side(worklists, keys, expected, mode):
    """The same ``findscu -W`` query to dicomagent and wlmscpfs: same responses, and
    the expected Scheduled Procedure Steps."""
    env = worklists
    ours = findscu(env.agent.host, env.agent.port, env.agent.ae_title, [*RETURN_KEYS, *keys],
                   env.work)
    if mode == WLM_MATCHES_OTHERWISE:
        theirs = findscu(env.wlm.host, env.wlm.port, WLM_AE,
                         [*RETURN_KEYS, *(key.partition("=")[0] for key in keys)], env.work)
        assert_success(theirs, "wlmscpfs")
        theirs.datasets = [ds for ds, sps in zip(theirs.datasets, theirs.sps_ids())
                           if sps in expected]
    else:
        theirs = findscu(env.wlm.host, env.wlm.port, WLM_AE, [*RETURN_KEYS, *keys], env.work)
        assert_success(theirs, "wlmscpfs")
    assert_success(ours, "dicomagent")
    assert Counter(theirs.sps_ids()) == Counter(expected), \
        f"wlmscpfs (the reference) did not answer as expected: {theirs.sps_ids()}"
    assert Counter(ours.sps_ids()) == Counter(expected), ours.sps_ids()
    for ds in ours.datasets:
        # One Scheduled Procedure Step per response (PS3.4 K.6.1.2.2).
        assert len(ds.ScheduledProcedureStepSequence) == 1, ds
    ours_set = Counter(canonical(ds) for ds in ours.datasets)
    theirs_set = Counter(canonical(ds) for ds in theirs.datasets)
    assert ours_set == theirs_set, (
        "responses differ\nonly dicomagent:\n" + "\n".join(ours_set - theirs_set)
        + "\nonly wlmscpfs:\n" + "\n".join(theirs_set - ours_set))


def test_response_values(worklists):
    """What dicomagent returns, checked against the items themselves: the values of
    every requested key, ISO_IR 100 decoded, the multi-valued AE title whole, the
    Specific Character Set of the item, and the other step of a two-step item absent."""
    keys = [*RETURN_KEYS, "RequestedProcedureCodeSequence[0].CodeValue",
            f"{SPS}.ScheduledProtocolCodeSequence[0].CodeValue", "PatientSex"]
    result = findscu(worklists.agent.host, worklists.agent.port, worklists.agent.ae_title,
                     keys, worklists.work)
    assert_success(result, "dicomagent")
    by_step = {ids: ds for ids, ds in zip(result.sps_ids(), result.datasets)}
    assert set(by_step) == ALL_STEPS
    for item in ITEMS:
        for step in item.steps:
            ds = by_step[step.sps_id]
            assert str(ds.PatientName) == item.patient_name
            assert ds.PatientID == item.patient_id
            assert ds.AccessionNumber == item.accession
            assert ds.RequestedProcedureID == item.requested_procedure_id
            assert ds.PatientSex == "O"
            assert ds.get("SpecificCharacterSet") == item.charset
            (got,) = ds.ScheduledProcedureStepSequence
            ae = got.ScheduledStationAETitle
            assert (list(ae) if isinstance(ae, pydicom.multival.MultiValue) else [ae]) \
                == step.station_ae.split("\\")
            assert got.ScheduledProcedureStepStartDate == step.date
            assert got.ScheduledProcedureStepStartTime == step.time
            assert got.Modality == step.modality
            assert str(got.ScheduledPerformingPhysicianName) == step.physician
            if step.protocol_code:
                assert [code.CodeValue for code in got.ScheduledProtocolCodeSequence] \
                    == [step.protocol_code]
            else:
                assert "ScheduledProtocolCodeSequence" in got
                assert len(got.ScheduledProtocolCodeSequence) == 0
            if item.procedure_code:
                assert [code.CodeValue for code in ds.RequestedProcedureCodeSequence] \
                    == [item.procedure_code]
                # Only the requested sub-keys of the stored item.
                assert set(ds.RequestedProcedureCodeSequence[0].keys()) == {0x00080100}
            else:
                assert len(ds.RequestedProcedureCodeSequence) == 0


def test_ls_json_one_row_per_step(worklists):
    """``worklist ls --json``: six entries for five files, each with its own step."""
    done = worklist_cli("ls", "--json", "--data-dir", str(worklists.agent.data_dir))
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert len(rows) == 6
    assert len({row["id"] for row in rows}) == 6
    steps = []
    for row in rows:
        ds = pydicom.Dataset.from_json(row["dataset"])
        assert len(ds.ScheduledProcedureStepSequence) == 1
        steps.append(ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID)
        assert row["source"]
    assert sorted(steps) == sorted(ALL_STEPS)
    sources = {row["source"] for row in rows
               if row["dataset"]["00100020"]["Value"] == ["P004"]}
    assert len(sources) == 1 and next(iter(sources)).endswith("wl4.wl"), sources


# --- the worklist commands with a running daemon ------------------------------------------


def test_add_query_rm_while_running(agent_factory, tmp_path):
    """Items added after the daemon started are found at once; removed ones are gone."""
    agent = agent_factory()
    keys = [*RETURN_KEYS, "PatientID=P9*"]

    def query() -> FindResult:
        result = findscu(agent.host, agent.port, agent.ae_title, keys, tmp_path)
        assert_success(result, "dicomagent")
        return result

    assert query().datasets == []
    item = Item("wl9", "LATE^ARRIVAL", "P900", "A900", "RP900",
                (Step("SPS900", "DX", "STN9", "20240201", "120000", "NEW^DOC"),))
    dump2dcm(item_dump(item, item.steps, 900), "ascii", tmp_path / "late.wl")
    json_item = pydicom.Dataset()
    json_item.PatientName = "JSON^ITEM"
    json_item.PatientID = "P901"
    step = pydicom.Dataset()
    step.ScheduledProcedureStepID = "SPS901"
    step.Modality = "CR"
    step.ScheduledStationAETitle = "STN9"
    json_item.ScheduledProcedureStepSequence = [step]
    (tmp_path / "item.json").write_text(json.dumps([json_item.to_json_dict()]))

    done = worklist_cli("add", "--data-dir", str(agent.data_dir), str(tmp_path / "late.wl"),
                        str(tmp_path / "item.json"))
    assert done.returncode == 0, done.stderr
    assert "added 2 item(s)" in done.stdout
    found = query()
    assert sorted(found.sps_ids()) == ["SPS900", "SPS901"]
    json_row = next(ds for ds in found.datasets if ds.PatientID == "P901")
    assert json_row.ScheduledProcedureStepSequence[0].Modality == "CR"
    assert json_row.AccessionNumber == ""            # asked for, not in the item

    listed = json.loads(worklist_cli("ls", "--json", "--data-dir",
                                     str(agent.data_dir)).stdout)
    late_id = next(row["id"] for row in listed if row["dataset"]["00100020"]["Value"]
                   == ["P900"])
    done = worklist_cli("rm", "--data-dir", str(agent.data_dir), str(late_id))
    assert done.returncode == 0, done.stderr
    assert query().sps_ids() == ["SPS901"]
    # Removing it again: it no longer exists.
    done = worklist_cli("rm", "--data-dir", str(agent.data_dir), str(late_id))
    assert done.returncode == 1


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["no-sps", "empty-sps", "not-dicom", "bad-json"])
def test_add_invalid_file_adds_nothing(tmp_path, kind):
    """One invalid file among valid ones: exit 1, the file named, nothing added."""
    data_dir = tmp_path / "data"
    good = tmp_path / "good"
    good.mkdir()
    item = ITEMS[0]
    dump2dcm(item_dump(item, item.steps, 1), "ascii", good / "a.wl")
    dump2dcm(item_dump(ITEMS[1], ITEMS[1].steps, 2), "ascii", good / "b.wl")
    bad_name = {"no-sps": "nosps.wl", "empty-sps": "emptysps.wl", "not-dicom": "junk.wl",
                "bad-json": "broken.json"}[kind]
    bad = tmp_path / bad_name
    if kind == "no-sps":
        dump2dcm("(0010,0010) PN [NO^STEPS]\n(0010,0020) LO [P777]\n", "ascii", bad)
    elif kind == "empty-sps":
        dump2dcm("(0010,0010) PN [EMPTY^STEPS]\n(0010,0020) LO [P778]\n"
                 "(0040,0100) SQ\n(fffe,e0dd) -\n", "ascii", bad)
    elif kind == "not-dicom":
        bad.write_bytes(b"this is not a worklist item\n" * 3)
    else:
        bad.write_text('{"00100010": {"vr": "PN", "Value": [')

    done = worklist_cli("add", "--data-dir", str(data_dir), str(good / "a.wl"), str(bad),
                        str(good / "b.wl"))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert bad_name in done.stderr, done.stderr
    assert "a.wl" not in done.stderr and "b.wl" not in done.stderr, done.stderr
    if kind in ("no-sps", "empty-sps"):
        assert "(0040,0100)" in done.stderr, done.stderr
    listed = worklist_cli("ls", "--json", "--data-dir", str(data_dir))
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    # The valid files alone are accepted.
    done = worklist_cli("add", "--data-dir", str(data_dir), str(good))
    assert done.returncode == 0, done.stderr
    assert "added 2 item(s)" in done.stdout
    assert len(json.loads(worklist_cli("ls", "--json", "--data-dir",
                                       str(data_dir)).stdout)) == 2


def test_cancel_after_the_first_match(agent_factory, tmp_path):
    """C-CANCEL (seed Table 40, FE00): 120 items, cancelled after the first response; the
    final status is Cancel and fewer than all items came back."""
    agent = agent_factory()
    items = [{"00100010": {"vr": "PN", "Value": [{"Alphabetic": f"CANCEL^{n:03d}"}]},
              "00100020": {"vr": "LO", "Value": [f"C{n:03d}"]},
              "00400100": {"vr": "SQ", "Value": [{
                  "00080060": {"vr": "CS", "Value": ["CT"]},
                  "00400009": {"vr": "SH", "Value": [f"SPSC{n:03d}"]}}]}}
             for n in range(120)]
    path = tmp_path / "many.json"
    path.write_text(json.dumps(items))
    added = worklist_cli("add", "--data-dir", str(agent.data_dir), str(path))
    assert added.returncode == 0, added.stdout + added.stderr
    result = run(dicomagent_cmd("find", agent.host, str(agent.port), "--model", "mwl",
                                "-k", "PatientName=CANCEL^*", "-k", "PatientID",
                                "--cancel-after", "1"), 30)
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"(\d+) matches, status 0x([0-9A-F]{4})", result.stderr)
    assert found, result.stderr
    assert found.group(2) == "FE00", result.stderr
    assert 1 <= int(found.group(1)) < 120, result.stderr
    # Without the cancel, all 120.
    result = run(dicomagent_cmd("find", agent.host, str(agent.port), "--model", "mwl",
                                "-k", "PatientName=CANCEL^*"), 30)
    assert "120 matches, status 0x0000" in result.stderr, result.stderr
