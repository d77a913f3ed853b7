#!/usr/bin/env python3
"""Query/Retrieve benchmark: C-FIND latency on a large index, C-MOVE beside C-STORE.

In one run, on 127.0.0.1:

1. Bulk-loads an index of synthetic records straight into SQLite (not over the network),
   in the schema ``dicomagent.archive.index.SQLiteIndex`` creates: by default 1,000,000
   instances in 100,000 studies (10 instances per study in 1-3 series), 20,000 patients
   with 5 studies each, study dates spread evenly over 10 years (2014-2023). Patient names
   are ``SURNAME^GIVEN``; every surname (``DOE``, ``SMITH``, … then made-up ones) belongs to
   20 patients, and no surname is the start of another, so ``DOE*`` (or any ``SURNAME*``)
   matches 100 studies whatever the size of the index. The ``attrs`` blobs are DICOM JSON
   packed with msgpack, as ``record_from_dataset`` makes them. A real study is added with
   ``dicomagent import``: 300 CT Image Storage objects of 512x512 16-bit (about 157 MB).
2. Starts DCMTK ``storescp`` (the C-MOVE destination, ``[peers.storescp]``) and
   ``dicomagent serve`` on that data dir.
3. Measures C-FIND latency over one association (association set-up not counted), as
   median and p99 of ``--queries`` queries of each kind, with values varied from query to
   query, and checks each query's match count against a count done directly in SQLite:

   - study level, exact Patient ID (5 studies each);
   - study level, Patient Name wild card ``SURNAME*`` (100 studies each, ``DOE*`` first);
   - study level, Study Date range of a few days (at most 100 studies);
   - series level, the series of one study (by Study Instance UID).

   Study-level queries ask for the return keys a viewer's worklist asks for, the computed
   ones included (Modalities in Study, Number of Study Related Series / Instances).
4. Measures C-MOVE of the CT study to storescp against the Storage SCU sending the same 300
   files (the archived copies C-MOVE reads) to the same storescp: ``store_files``, the code
   of ``dicomagent store``, in this process; and, for information, the ``dicomagent store``
   command as a whole (its start-up included). ``--rounds`` alternating rounds, median.
5. Prints a table with the figures and targets; ``--json FILE`` writes them.

    python3 bench/query.py [--instances 1000000] [--queries 200] [--rounds 5]
                           [--data-dir DIR] [--keep] [--json FILE] [--explain]

The index goes in ``--data-dir`` (``index.sqlite``, and ``archive/`` for the CT study),
recorded in ``bench-query.json`` there; a later run with the same ``--instances`` and
``--seed`` reuses it. A data dir you name is kept; the default temporary one is removed at
the end unless ``--keep``. Targets (set for 1,000,000 instances): exact-key C-FIND p50 < 10
ms, wild card and range p50 < 50 ms, C-MOVE at least 0.8x the C-STORE SCU's objects/s.
``--explain`` (or a query kind that misses its target) prints the SQLite query plan of the
SQL ``dicomagent.archive.query.plan_query`` makes for that kind's first identifier.

Needs pydicom, numpy and msgpack (like dicomagent), and DCMTK (``storescp``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Measure this checkout, not an installed dicomagent.
sys.path.insert(0, str(REPO))

import msgpack  # noqa: E402

import store  # noqa: E402 - bench/store.py: the CT series it sends is the study moved here
from _process import (BenchError, HOST, ServerProcess, cpu_times, free_port,  # noqa: E402
                      stop_on_sigterm, storescp_version)

GENERATOR_VERSION = 1            # bump when the synthetic index changes: a reused one is rebuilt
SIDECAR = "bench-query.json"
CALLING_AE_TITLE = "BENCHSCU"
AGENT_AE_TITLE = "DICOMAGENT"
STORESCP_AE_TITLE = "STORESCP"

INSTANCES_PER_STUDY = 10
STUDIES_PER_PATIENT = 5
PATIENTS_PER_SURNAME = 20        # x 5 studies: ``SURNAME*`` matches 100 studies
FIRST_DAY = datetime.date(2014, 1, 1)
DAYS = (datetime.date(2024, 1, 1) - FIRST_DAY).days      # 10 years
MAX_RANGE_MATCHES = 100
CHUNK_STUDIES = 2000             # studies per load transaction (20,000 instances)
CT_OBJECTS = 300
CHARSET = "ISO_IR 100"

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
# Modality -> (SOP Class UID, Rows, Columns, Bits Allocated, file size in bytes).
MODALITIES = {
    "CT": ("1.2.840.10008.5.1.4.1.1.2", 512, 512, 16, 526_000),
    "MR": ("1.2.840.10008.5.1.4.1.1.4", 256, 256, 16, 133_000),
    "CR": ("1.2.840.10008.5.1.4.1.1.1", 2048, 2500, 16, 10_241_000),
    "DX": ("1.2.840.10008.5.1.4.1.1.1.1", 3000, 3000, 16, 18_001_000),
    "US": ("1.2.840.10008.5.1.4.1.1.6.1", 600, 800, 8, 1_441_000),
    "MG": ("1.2.840.10008.5.1.4.1.1.1.2", 3328, 2560, 16, 17_040_000),
}
MODALITY_WEIGHTS = {"CT": 30, "MR": 20, "CR": 20, "DX": 15, "US": 10, "MG": 5}
#: Real surnames first (``DOE`` first of all); made-up ones fill up to the number needed.
SURNAMES = """DOE SMITH JOHNSON WILLIAMS BROWN JONES GARCIA MILLER DAVIS RODRIGUEZ MARTINEZ
HERNANDEZ LOPEZ GONZALEZ WILSON ANDERSON THOMAS TAYLOR MOORE JACKSON LEE PEREZ THOMPSON
WHITE HARRIS SANCHEZ CLARK RAMIREZ LEWIS ROBINSON WALKER YOUNG ALLEN KING WRIGHT SCOTT
TORRES NGUYEN HILL FLORES GREEN ADAMS NELSON BAKER HALL RIVERA CAMPBELL MITCHELL CARTER
ROBERTS MULLER SCHMIDT SCHNEIDER FISCHER WEBER MEYER WAGNER BECKER SCHULZ HOFFMANN DUPONT
DURAND LEROY MOREAU ROSSI RUSSO FERRARI ESPOSITO BIANCHI ROMANO SATO SUZUKI TAKAHASHI TANAKA
WATANABE KIM PARK CHOI WANG ZHANG LIU CHEN YANG HUANG ZHAO ZHOU SILVA SANTOS OLIVEIRA
SOUZA PEREIRA COSTA NOVAK HORVATH KOWALSKI NOWAK JANSEN DEVRIES BAKKER VISSER PETERSEN
NIELSEN HANSEN LARSEN ANDERSSON JOHANSSON KARLSSON""".split()
GIVEN_NAMES = {
    "M": "JOHN JAMES ROBERT MICHAEL DAVID WILLIAM RICHARD JOSEPH THOMAS PETER PAUL MARK "
         "LUCAS HANS PIERRE MARCO KENJI MIN JIAN CARLOS".split(),
    "F": "ANNA MARY PATRICIA JENNIFER LINDA ELIZABETH BARBARA SUSAN JESSICA SARAH KAREN "
         "EMMA SOPHIE MARIE GIULIA YUKI SOO LING ANA EVA".split(),
}
REFERRING = ["HOUSE^GREGORY", "GREY^MEREDITH", "KILDARE^JAMES", "QUINN^MICHAELA", "ROSS^DOUG",
             "WELBY^MARCUS", ""]


# --- the synthetic index ------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How many of each, and the names: everything follows from (instances, seed)."""

    instances: int
    seed: int
    studies: int
    patients: int
    surnames: tuple[str, ...]
    root: str

    @classmethod
    def make(cls, instances: int, seed: int) -> "Plan":
        studies = instances // INSTANCES_PER_STUDY
        patients = max(1, studies // STUDIES_PER_PATIENT)
        # A UUID-derived root (PS3.5 §B.2) for this index's UIDs; each UID adds a few
        # components, and stays within 64 characters.
        root = "2.25.%d" % uuid.uuid5(uuid.NAMESPACE_URL, f"dicomagent/bench/query/{seed}").int
        return cls(studies * INSTANCES_PER_STUDY, seed, studies, patients,
                   tuple(surnames(math.ceil(patients / PATIENTS_PER_SURNAME))), root)

    def patient_id(self, k: int) -> str:
        return f"PID{k:07d}"

    def study_uid(self, s: int) -> str:
        return f"{self.root}.1.{s + 1}"

    def series_uid(self, s: int, k: int) -> str:
        return f"{self.root}.2.{s + 1}.{k + 1}"

    def instance_uid(self, s: int, k: int, i: int) -> str:
        return f"{self.root}.3.{s + 1}.{k + 1}.{i + 1}"

    def full_surnames(self) -> list[str]:
        """Surnames that have all PATIENTS_PER_SURNAME patients (the last may have fewer)."""
        full = self.patients // PATIENTS_PER_SURNAME
        return list(self.surnames[:max(1, full)])

    def max_studies_per_day(self) -> int:
        return math.ceil(self.studies / DAYS)

    def range_days(self) -> int:
        """Days in a Study Date range query: at most MAX_RANGE_MATCHES studies."""
        return max(1, MAX_RANGE_MATCHES // self.max_studies_per_day())


def surnames(count: int) -> list[str]:
    """``count`` surnames, none of which is the start of another (so ``NAME*`` is exact)."""
    real = list(dict.fromkeys(SURNAMES))
    ordered = sorted(real)
    # In sorted order, a name that is the start of others is the start of the next one.
    prefixes = {a for a, b in zip(ordered, ordered[1:]) if b.startswith(a)}
    names = [n for n in real if n not in prefixes]
    assert names[0] == "DOE"
    rng = random.Random(7)
    consonants, vowels = "BDFGKLMNPRSTVZ", "AEIOU"
    seen = set(names)
    while len(names) < count:
        made = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(3))
        if made in seen or any(made.startswith(r) or r.startswith(made) for r in real):
            continue
        seen.add(made)
        names.append(made)          # all made-up names have 6 letters: none starts another
    return names[:count]


def _string(vr: str, value: str) -> dict:
    return {"vr": vr, "Value": [value]} if value else {"vr": vr}


def _person(value: str) -> dict:
    return {"vr": "PN", "Value": [{"Alphabetic": value}]} if value else {"vr": "PN"}


def _number(vr: str, value: int) -> dict:
    return {"vr": vr, "Value": [value]}


def _check_columns(table_columns: list[str], wanted: list[str], table: str) -> None:
    from dicomagent.archive.index import FILE_COLUMNS
    known = set(table_columns) | set(FILE_COLUMNS) | {"attrs", "patient_key", "SpecificCharacterSet",
                                                      "StudyInstanceUID", "SeriesInstanceUID"}
    missing = [c for c in wanted if c not in known]
    if missing:
        raise BenchError(f"the index schema has no {table} column(s) {missing}: update bench/query.py")


def load_index(path: Path, plan: Plan) -> dict:
    """Create the index with SQLiteIndex's schema and fill it with ``plan``'s records."""
    from dicomagent.archive.index import (INSTANCE_COLUMNS, PATIENT_COLUMNS, SERIES_COLUMNS,
                                          STUDY_COLUMNS, SQLiteIndex)

    patient_cols = ["patient_key", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "attrs"]
    study_cols = ["StudyInstanceUID", "patient_key", "StudyID", "StudyDate", "StudyTime",
                  "AccessionNumber", "ReferringPhysicianName", "SpecificCharacterSet", "attrs"]
    series_cols = ["SeriesInstanceUID", "StudyInstanceUID", "SeriesNumber", "Modality",
                   "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "attrs"]
    instance_cols = ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "InstanceNumber",
                     "SOPClassUID", "Rows", "Columns", "BitsAllocated", "attrs", "path", "size",
                     "transfer_syntax", "received_at", "calling_ae_title", "crc32"]
    _check_columns(PATIENT_COLUMNS, patient_cols, "patients")
    _check_columns(STUDY_COLUMNS, study_cols, "studies")
    _check_columns(SERIES_COLUMNS, series_cols, "series")
    _check_columns(INSTANCE_COLUMNS, instance_cols, "instances")

    def insert(table: str, cols: list[str]) -> str:
        return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"

    SQLiteIndex(path, durable=False).close()        # the schema, exactly as the agent makes it
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-1048576")         # 1 GiB: index pages stay in memory
    pack = msgpack.Packer(use_bin_type=True).pack
    rng = random.Random(plan.seed)
    start = time.perf_counter()
    tty = sys.stdout.isatty()

    # Patients: surnames in blocks of PATIENTS_PER_SURNAME, keys shuffled against names.
    order = list(range(plan.patients))
    rng.shuffle(order)
    patient_rows = []
    for k in range(plan.patients):
        surname = plan.surnames[order[k] // PATIENTS_PER_SURNAME]
        sex = rng.choice("MF")
        name = f"{surname}^{rng.choice(GIVEN_NAMES[sex])}"
        birth = (datetime.date(1930, 1, 1) + datetime.timedelta(days=rng.randrange(85 * 365))).strftime("%Y%m%d")
        pid = plan.patient_id(k)
        attrs = {"00080005": _string("CS", CHARSET), "00100010": _person(name),
                 "00100020": _string("LO", pid), "00100030": _string("DA", birth),
                 "00100040": _string("CS", sex)}
        patient_rows.append((k + 1, name, pid, birth, sex, pack(attrs)))
    db.execute("BEGIN")
    db.executemany(insert("patients", patient_cols), patient_rows)
    db.execute("COMMIT")
    del patient_rows

    # Each patient gets STUDIES_PER_PATIENT studies (the remainder goes round), dates
    # spread evenly over DAYS: at most ceil(studies / DAYS) studies on a day.
    owners = [s % plan.patients for s in range(plan.studies)]
    rng.shuffle(owners)
    days = [s * DAYS // plan.studies for s in range(plan.studies)]
    rng.shuffle(days)
    modalities = list(MODALITY_WEIGHTS)
    weights = list(MODALITY_WEIGHTS.values())
    sql_study = insert("studies", study_cols)
    sql_series = insert("series", series_cols)
    sql_instance = insert("instances", instance_cols)
    received = time.time()
    cs_attr = _string("CS", CHARSET)
    for first in range(0, plan.studies, CHUNK_STUDIES):
        studies, series_rows, instances = [], [], []
        for s in range(first, min(first + CHUNK_STUDIES, plan.studies)):
            study_uid = plan.study_uid(s)
            date = (FIRST_DAY + datetime.timedelta(days=days[s])).strftime("%Y%m%d")
            tm = f"{rng.randrange(7, 20):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"
            accession = f"ACC{s + 1:09d}"
            study_id = str(s % 100000 + 1)
            referring = rng.choice(REFERRING)
            attrs = {"00080005": cs_attr, "00080020": _string("DA", date), "00080030": _string("TM", tm),
                     "00080050": _string("SH", accession), "00080090": _person(referring),
                     "0020000D": _string("UI", study_uid), "00200010": _string("SH", study_id)}
            studies.append((study_uid, owners[s] + 1, study_id, date, tm, accession, referring,
                            CHARSET, pack(attrs)))
            modality = rng.choices(modalities, weights)[0]
            n_series = rng.randint(1, 3)
            cuts = sorted(rng.sample(range(1, INSTANCES_PER_STUDY), n_series - 1))
            sizes = [b - a for a, b in zip([0] + cuts, cuts + [INSTANCES_PER_STUDY])]
            sop_class, rows, columns, bits, size = MODALITIES[modality]
            for k, count in enumerate(sizes):
                series_uid = plan.series_uid(s, k)
                number = k + 1
                request = [{"00400009": _string("SH", f"SPS{s + 1:08d}"),
                            "00401001": _string("SH", f"RP{s + 1:08d}")}]
                attrs = {"00080005": cs_attr, "00080060": _string("CS", modality),
                         "0020000E": _string("UI", series_uid), "00200011": _number("IS", number),
                         "00400244": _string("DA", date), "00400245": _string("TM", tm),
                         "00400275": {"vr": "SQ", "Value": request}}
                series_rows.append((series_uid, study_uid, str(number), modality, date, tm, pack(attrs)))
                study_dir = f"archive/{study_uid}/{series_uid}/"
                for i in range(count):
                    sop_uid = plan.instance_uid(s, k, i)
                    attrs = {"00080005": cs_attr, "00080016": _string("UI", sop_class),
                             "00080018": _string("UI", sop_uid), "00200013": _number("IS", i + 1),
                             "00280010": _number("US", rows), "00280011": _number("US", columns),
                             "00280100": _number("US", bits)}
                    instances.append((sop_uid, series_uid, study_uid, str(i + 1), sop_class, str(rows),
                                      str(columns), str(bits), pack(attrs), study_dir + sop_uid + ".dcm",
                                      size, EXPLICIT_VR_LITTLE_ENDIAN, received, "MODALITY",
                                      zlib.crc32(sop_uid.encode())))
        db.execute("BEGIN")
        db.executemany(sql_study, studies)
        db.executemany(sql_series, series_rows)
        db.executemany(sql_instance, instances)
        db.execute("COMMIT")
        done = min(first + CHUNK_STUDIES, plan.studies)
        if done == plan.studies or (done // CHUNK_STUDIES) % (5 if tty else 25) == 0:
            print(("\r" if tty else "") + f"  loaded {done * INSTANCES_PER_STUDY:,} of {plan.instances:,} "
                  f"instances ({time.perf_counter() - start:.0f} s)", end="" if tty else "\n", flush=True)
    if tty:
        print(flush=True)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "bytes": path.stat().st_size}


def index_counts(path: Path) -> dict[str, int]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for table in ("patients", "studies", "series", "instances")}
    finally:
        db.close()


# --- the CT study ---------------------------------------------------------------------------


def ct_files(data_dir: Path, study_uid: str) -> list[Path]:
    db = sqlite3.connect(f"file:{data_dir / 'index.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT path FROM instances WHERE StudyInstanceUID = ? "
                          "ORDER BY CAST(InstanceNumber AS INTEGER)", (study_uid,)).fetchall()
    finally:
        db.close()
    return [data_dir / path for (path,) in rows]


# --- preparing the data dir -----------------------------------------------------------------


def write_config(path: Path, storescp_port: int) -> None:
    path.write_text(
        f'[agent]\nae_title = "{AGENT_AE_TITLE}"\nlog_contexts = false\n\n'
        "[storage]\nfsync = false\nmin_free_mb = 1\n\n"
        f'[peers.storescp]\nae_title = "{STORESCP_AE_TITLE}"\nhost = "{HOST}"\nport = {storescp_port}\n')


def prepare(data_dir: Path, plan: Plan, config: Path, env: dict[str, str]) -> dict:
    """The data dir with the synthetic index and the CT study, reused when it matches."""
    sidecar_path = data_dir / SIDECAR
    index_path = data_dir / "index.sqlite"
    wanted = {"generator": GENERATOR_VERSION, "instances": plan.instances, "seed": plan.seed}
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, ValueError):
        sidecar = None
    if sidecar is None and (index_path.exists() or (data_dir / "archive").exists()):
        raise BenchError(f"{data_dir} holds an archive this script did not make; choose another --data-dir")
    reuse = sidecar is not None and all(sidecar.get(k) == v for k, v in wanted.items()) \
        and index_path.exists()
    if reuse:
        counts = index_counts(index_path)
        ct = sidecar.get("ct") or {}
        expected_instances = plan.instances + (CT_OBJECTS if ct else 0)
        if counts["studies"] != plan.studies + (1 if ct else 0) or counts["instances"] != expected_instances:
            reuse = False
    if reuse:
        print(f"index: reusing {index_path} ({plan.instances:,} instances, "
              f"{index_path.stat().st_size / 1e6:,.0f} MB)", flush=True)
        load = sidecar["load"]
    else:
        for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm", SIDECAR):
            (data_dir / name).unlink(missing_ok=True)
        for name in ("archive", "tmp", "ct-source"):
            shutil.rmtree(data_dir / name, ignore_errors=True)
        data_dir.mkdir(parents=True, exist_ok=True)
        print(f"index: loading {plan.instances:,} instances, {plan.studies:,} studies, "
              f"{plan.patients:,} patients into {index_path}", flush=True)
        load = load_index(index_path, plan)
        print(f"index: loaded in {load['seconds']:.1f} s, {load['bytes'] / 1e6:,.0f} MB", flush=True)
        sidecar = dict(wanted, load=load)
        sidecar_path.write_text(json.dumps(sidecar, indent=1) + "\n")

    ct = sidecar.get("ct")
    files = ct_files(data_dir, ct["study_uid"]) if ct else []
    if not ct or len(files) != CT_OBJECTS or not all(p.exists() for p in files):
        if ct:
            raise BenchError(f"the CT study in {data_dir} is incomplete; remove {sidecar_path} to rebuild")
        source = data_dir / "ct-source"
        shutil.rmtree(source, ignore_errors=True)
        start = time.perf_counter()
        print(f"CT study: generating {CT_OBJECTS} objects ...", end="", flush=True)
        study_uid = store.generate_ct(source, CT_OBJECTS)["study_uid"]
        print(f" {time.perf_counter() - start:.1f} s; dicomagent import ...", end="", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "dicomagent", "import", "--data-dir", str(data_dir),
                               "-c", str(config), str(source)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"dicomagent import failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        print(f" {time.perf_counter() - start:.1f} s ({done.stdout.strip()})", flush=True)
        shutil.rmtree(source)
        files = ct_files(data_dir, study_uid)
        if len(files) != CT_OBJECTS:
            raise BenchError(f"the index holds {len(files)} instances of the CT study, not {CT_OBJECTS}")
        ct = {"study_uid": study_uid, "objects": CT_OBJECTS, "bytes": sum(p.stat().st_size for p in files)}
        sidecar["ct"] = ct
        sidecar_path.write_text(json.dumps(sidecar, indent=1) + "\n")
    return {"load": load, "ct": ct, "reused": reuse}


# --- the queries ----------------------------------------------------------------------------

STUDY_RETURN_KEYS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                     "StudyTime", "AccessionNumber", "StudyID", "StudyInstanceUID",
                     "ReferringPhysicianName", "StudyDescription", "ModalitiesInStudy",
                     "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
SERIES_RETURN_KEYS = ["StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
                      "SeriesDescription", "PerformedProcedureStepStartDate",
                      "NumberOfSeriesRelatedInstances"]


def identifier(level: str, keys: list[str], **values: str):
    """A C-FIND identifier: every return key, empty unless given a value."""
    import pydicom
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    ds = pydicom.Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in keys:
        tag = tag_for_keyword(keyword)
        ds.add_new(tag, dictionary_VR(tag), values.get(keyword) or None)
    return ds


@dataclass
class Kind:
    """One kind of query: its identifiers, their expected match counts, and the results."""

    name: str
    label: str
    target_ms: float
    target_text: str
    #: The first ``warmup`` identifiers are for the warm-up; the rest are timed.
    warmup: int = 0
    identifiers: list = field(default_factory=list)
    expected: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)     # seconds
    matches: list[int] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)      # seconds, per query

    def p(self, q: float) -> float:
        """Nearest-rank percentile, in ms."""
        values = sorted(self.latencies)
        return values[max(0, math.ceil(q / 100 * len(values)) - 1)] * 1000

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) * 1000

    @property
    def ok(self) -> bool:
        return self.p50 < self.target_ms


def build_kinds(plan: Plan, n: int, warmup: int, index_path: Path) -> list[Kind]:
    """``warmup`` + ``n`` identifiers of each kind, values chosen at random (seeded), and
    their expected match counts from SQL written here, independently of the agent's."""
    rng = random.Random(plan.seed + 1)
    days = plan.range_days()
    full = plan.full_surnames()
    names = [rng.choice(full) for _ in range(warmup + n)]
    names[0] = names[warmup] = "DOE"            # checked first, and timed first
    kinds = [
        Kind("patient_id", "study, exact PatientID", 10.0, "p50 < 10 ms", warmup),
        Kind("patient_name", "study, PatientName SURNAME*", 50.0, "p50 < 50 ms", warmup),
        Kind("study_date", f"study, StudyDate {days}-day range", 50.0, "p50 < 50 ms", warmup),
        Kind("series", "series of one study", 10.0, "p50 < 10 ms", warmup),
    ]
    db = sqlite3.connect(f"file:{index_path}?mode=ro", uri=True)
    try:
        for i in range(warmup + n):
            pid = plan.patient_id(rng.randrange(plan.patients))
            kinds[0].identifiers.append(identifier("STUDY", STUDY_RETURN_KEYS, PatientID=pid))
            kinds[0].expected.append(db.execute(
                "SELECT COUNT(*) FROM studies WHERE patient_key = "
                "(SELECT patient_key FROM patients WHERE PatientID = ?)", (pid,)).fetchone()[0])

            surname = names[i]
            kinds[1].identifiers.append(identifier("STUDY", STUDY_RETURN_KEYS, PatientName=surname + "*"))
            kinds[1].expected.append(db.execute(
                "SELECT COUNT(*) FROM studies WHERE patient_key IN (SELECT patient_key FROM "
                "patients WHERE substr(PatientName, 1, ?) = ?)", (len(surname), surname)).fetchone()[0])

            first = FIRST_DAY + datetime.timedelta(days=rng.randrange(DAYS - days + 1))
            low = first.strftime("%Y%m%d")
            high = (first + datetime.timedelta(days=days - 1)).strftime("%Y%m%d")
            kinds[2].identifiers.append(identifier("STUDY", STUDY_RETURN_KEYS, StudyDate=f"{low}-{high}"))
            kinds[2].expected.append(db.execute(
                "SELECT COUNT(*) FROM studies WHERE StudyDate BETWEEN ? AND ?", (low, high)).fetchone()[0])

            study_uid = plan.study_uid(rng.randrange(plan.studies))
            kinds[3].identifiers.append(identifier("SERIES", SERIES_RETURN_KEYS, StudyInstanceUID=study_uid))
            kinds[3].expected.append(db.execute(
                "SELECT COUNT(*) FROM series WHERE StudyInstanceUID = ?", (study_uid,)).fetchone()[0])
    finally:
        db.close()
    return kinds


def explain(index_path: Path, kind: Kind) -> str:
    """The SQL plan_query makes for the kind's first timed identifier, and SQLite's plan."""
    from dicomagent.archive.query import plan_query
    query = plan_query(kind.identifiers[kind.warmup], "study")
    db = sqlite3.connect(f"file:{index_path}?mode=ro", uri=True)
    try:
        rows = db.execute("EXPLAIN QUERY PLAN " + query.sql, query.params).fetchall()
    finally:
        db.close()
    depth = {0: 0}
    lines = [f"  {kind.label}:", f"    SQL: {query.sql}", f"    params: {query.params}"]
    for node, parent, _, detail in rows:
        depth[node] = depth.get(parent, 0) + 1
        lines.append("    " + "  " * depth[node] + detail)
    return "\n".join(lines)


async def run_queries(port: int, kinds: list[Kind], server_pid: int) -> None:
    """All the C-FIND queries on one association, the kinds interleaved."""
    from dicomagent.association import associate
    from dicomagent.dimse.commands import C_FIND_RQ
    from dicomagent.services.qr import STUDY_ROOT_FIND
    from dicomagent.transcode import decode, encode
    from dicomagent.uids import UNCOMPRESSED_TRANSFER_SYNTAXES
    from dicomagent.ul.negotiation import ProposedContext

    association = await associate(HOST, port, CALLING_AE_TITLE, AGENT_AE_TITLE,
                                  [ProposedContext(STUDY_ROOT_FIND, UNCOMPRESSED_TRANSFER_SYNTAXES)],
                                  artim_timeout=30, dimse_timeout=120, network_timeout=30)
    try:
        context = association.context_for(STUDY_ROOT_FIND)
        syntax = context.transfer_syntax

        async def one(payload: bytes, keep: list | None = None) -> tuple[int, int]:
            message_id = association.next_message_id()
            association.send_message(context.context_id, C_FIND_RQ(
                AffectedSOPClassUID=STUDY_ROOT_FIND, MessageID=message_id), payload)
            matches = 0
            while True:
                received = await association.wait_response(message_id)
                status = received.command.Status
                if status in (0xFF00, 0xFF01):
                    matches += 1
                    if keep is not None:
                        keep.append(received.data_set)
                    continue
                association.done_with(message_id)
                return matches, status

        payloads = {kind.name: [encode(ds, syntax) for ds in kind.identifiers] for kind in kinds}
        # Check the responses once (decoded): the first query of each kind.
        for kind in kinds:
            kept: list = []
            matches, status = await one(payloads[kind.name][0], kept)
            if status != 0 or matches != kind.expected[0]:
                raise BenchError(f"{kind.label}: {matches} matches, status 0x{status:04X}; "
                                 f"expected {kind.expected[0]}, status 0x0000")
            check_responses(kind, [decode(bytes(d), syntax) for d in kept])
        for i in range(kinds[0].warmup):            # warm-up, on values not timed after
            for kind in kinds:
                await one(payloads[kind.name][i])
        for i in range(kinds[0].warmup, len(kinds[0].identifiers)):
            for kind in kinds:
                cpu_before = sum(cpu_times(server_pid))
                start = time.perf_counter()
                matches, status = await one(payloads[kind.name][i])
                elapsed = time.perf_counter() - start
                kind.server_cpu.append(sum(cpu_times(server_pid)) - cpu_before)
                if status != 0 or matches != kind.expected[i]:
                    raise BenchError(f"{kind.label} #{i + 1}: {matches} matches, status 0x{status:04X}; "
                                     f"expected {kind.expected[i]}, status 0x0000")
                kind.latencies.append(elapsed)
                kind.matches.append(matches)
    finally:
        await association.release()


def check_responses(kind: Kind, responses: list) -> None:
    """The first responses of each kind carry what was asked for."""
    query = kind.identifiers[0]
    for ds in responses:
        if kind.name == "patient_id" and ds.PatientID != query.PatientID:
            raise BenchError(f"{kind.label}: a response has PatientID {ds.PatientID!r}")
        if kind.name == "patient_name" and not str(ds.PatientName).startswith(str(query.PatientName)[:-1]):
            raise BenchError(f"{kind.label}: a response has PatientName {ds.PatientName!r}")
        if kind.name == "study_date":
            low, high = query.StudyDate.split("-")
            if not low <= ds.StudyDate <= high:
                raise BenchError(f"{kind.label}: a response has StudyDate {ds.StudyDate!r}")
        if kind.name == "series" and ds.StudyInstanceUID != query.StudyInstanceUID:
            raise BenchError(f"{kind.label}: a response has StudyInstanceUID {ds.StudyInstanceUID!r}")
        if kind.name != "series":
            if not ds.get("NumberOfStudyRelatedInstances") or not ds.get("ModalitiesInStudy"):
                raise BenchError(f"{kind.label}: computed keys missing in a response:\n{ds}")
            if int(ds.NumberOfStudyRelatedInstances) != INSTANCES_PER_STUDY:
                raise BenchError(f"{kind.label}: NumberOfStudyRelatedInstances "
                                 f"{ds.NumberOfStudyRelatedInstances}, not {INSTANCES_PER_STUDY}")
        elif not ds.get("NumberOfSeriesRelatedInstances") or not ds.get("Modality"):
            raise BenchError(f"{kind.label}: keys missing in a response:\n{ds}")


# --- C-MOVE and C-STORE ------------------------------------------------------------------


async def c_move(port: int, study_uid: str) -> tuple[float, int, int]:
    """C-MOVE the study to storescp over an established association: (seconds, completed, failed)."""
    from dicomagent.association import associate
    from dicomagent.dimse.commands import C_MOVE_RQ
    from dicomagent.services.qr import STUDY_ROOT_MOVE
    from dicomagent.transcode import encode
    from dicomagent.uids import UNCOMPRESSED_TRANSFER_SYNTAXES
    from dicomagent.ul.negotiation import ProposedContext

    association = await associate(HOST, port, CALLING_AE_TITLE, AGENT_AE_TITLE,
                                  [ProposedContext(STUDY_ROOT_MOVE, UNCOMPRESSED_TRANSFER_SYNTAXES)],
                                  artim_timeout=30, dimse_timeout=600, network_timeout=30)
    try:
        context = association.context_for(STUDY_ROOT_MOVE)
        payload = encode(identifier("STUDY", ["StudyInstanceUID"], StudyInstanceUID=study_uid),
                         context.transfer_syntax)
        start = time.perf_counter()
        message_id = association.next_message_id()
        association.send_message(context.context_id, C_MOVE_RQ(
            AffectedSOPClassUID=STUDY_ROOT_MOVE, MessageID=message_id,
            MoveDestination=STORESCP_AE_TITLE), payload)
        while True:
            rsp = (await association.wait_response(message_id)).command
            if rsp.Status != 0xFF00:
                break
        seconds = time.perf_counter() - start
        association.done_with(message_id)
        if rsp.Status != 0:
            raise BenchError(f"C-MOVE final status 0x{rsp.Status:04X} {rsp.ErrorComment or ''}")
        return seconds, rsp.NumberOfCompletedSuboperations or 0, rsp.NumberOfFailedSuboperations or 0
    finally:
        await association.release()


async def c_store(port: int, directory: Path) -> tuple[float, int, int]:
    """``dicomagent store``'s code (scan + store_files) in this process: (seconds, sent, failed)."""
    from dicomagent.store import scan, store_files
    start = time.perf_counter()
    files, _ = scan([str(directory)])
    report = await store_files(HOST, port, CALLING_AE_TITLE, STORESCP_AE_TITLE, files)
    return time.perf_counter() - start, report.sent, report.failed


def c_store_cli(port: int, directory: Path, env: dict[str, str]) -> tuple[float, int, int]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dicomagent", "store", "--no-progress",
                           "-aet", CALLING_AE_TITLE, "-aec", STORESCP_AE_TITLE, HOST, str(port),
                           str(directory)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(f"dicomagent store failed ({done.returncode}): {done.stdout}{done.stderr}")
    sent = int(done.stdout.split("sent ")[1].split(",")[0])
    return seconds, sent, 0


def empty(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    os.sync()           # the next run must not pay for this one's write-back


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=1_000_000,
                   help="instances in the synthetic index (default 1,000,000; 10 per study)")
    p.add_argument("--queries", type=int, default=200, help="timed C-FIND queries of each kind (default 200)")
    p.add_argument("--warmup", type=int, default=10, help="untimed queries of each kind first (default 10)")
    p.add_argument("--rounds", type=int, default=5, help="C-MOVE / C-STORE rounds (default 5)")
    p.add_argument("--seed", type=int, default=1, help="seed of the synthetic index and the queries")
    p.add_argument("--data-dir", type=Path, help="where the index goes (kept; reused when it matches)")
    p.add_argument("--keep", action="store_true", help="keep the default temporary data dir")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument("--explain", action="store_true", help="print the query plans of every kind")
    args = p.parse_args(argv)
    if args.instances < 1000 or args.queries < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--instances at least 1000, --queries and --rounds positive, --warmup not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("storescp") is None:
        print("storescp not found: install the Debian package dcmtk", file=sys.stderr)
        return 2
    stop_on_sigterm()
    import uvloop

    plan = Plan.make(args.instances, args.seed)
    own_data_dir = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="bench-query-data-")) if own_data_dir else args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-query-"))
    env = dict(os.environ, TCP_NODELAY="1",       # DCMTK: disable Nagle (else ~40 ms/message)
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    servers: list[ServerProcess] = []
    try:
        scp_port, agent_port = free_port(), free_port()
        config = workdir / "dicomagent.toml"
        write_config(config, scp_port)
        prepared = prepare(data_dir, plan, config, env)
        index_path = data_dir / "index.sqlite"
        counts = index_counts(index_path)
        kinds = build_kinds(plan, args.queries, args.warmup, index_path)
        load_before = os.getloadavg()

        out = workdir / "storescp-out"
        out.mkdir()
        storescp = ServerProcess("storescp", ["storescp", "-aet", STORESCP_AE_TITLE, "-od", str(out), str(scp_port)],
                          scp_port, workdir, env)
        servers.append(storescp)
        agent = ServerProcess("dicomagent", [sys.executable, "-m", "dicomagent", "serve", "--host", HOST,
                                      "--port", str(agent_port), "--data-dir", str(data_dir),
                                      "-c", str(config)], agent_port, workdir, env)
        servers.append(agent)
        for server in servers:
            server.wait_ready()

        print(f"C-FIND: {args.queries} queries of each of {len(kinds)} kinds on one association "
              f"(after {args.warmup} warm-up each) ...", flush=True)
        uvloop.run(run_queries(agent_port, kinds, agent.proc.pid))

        ct = prepared["ct"]
        ct_dir = ct_files(data_dir, ct["study_uid"])[0].parent
        runs: dict[str, list[tuple[float, float]]] = {"move": [], "store": [], "store_cli": []}
        print(f"C-MOVE / C-STORE of {ct['objects']} CT objects ({ct['bytes'] / 1e6:.0f} MB) to storescp, "
              f"{args.rounds} rounds ...", flush=True)
        actions = {
            "move": lambda: uvloop.run(c_move(agent_port, ct["study_uid"])),
            "store": lambda: uvloop.run(c_store(scp_port, ct_dir)),
            "store_cli": lambda: c_store_cli(scp_port, ct_dir, env),
        }
        empty(out)
        uvloop.run(c_store(scp_port, ct_dir))            # warm-up: page cache, storescp
        for round_no in range(args.rounds):
            order = list(actions) if round_no % 2 == 0 else list(reversed(actions))
            for name in order:
                empty(out)
                # CPU of the sender: the agent for C-MOVE, this process or the command for C-STORE.
                agent_cpu, own_cpu = sum(cpu_times(agent.proc.pid)), time.process_time()
                children_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
                seconds, done, failed = actions[name]()
                children = resource.getrusage(resource.RUSAGE_CHILDREN)
                sender_cpu = {
                    "move": sum(cpu_times(agent.proc.pid)) - agent_cpu,
                    "store": time.process_time() - own_cpu,
                    "store_cli": children.ru_utime + children.ru_stime - children_cpu.ru_utime - children_cpu.ru_stime,
                }[name]
                received = sum(1 for _ in out.iterdir())
                if done != ct["objects"] or failed or received != ct["objects"]:
                    raise BenchError(f"{name}: {done} sent, {failed} failed, storescp has {received} "
                                     f"files; expected {ct['objects']}")
                runs[name].append((seconds, sender_cpu))
        empty(out)
        load_after = os.getloadavg()
        # The query plans, while the index is still there (a temporary one goes below).
        plans = [explain(index_path, kind) for kind in kinds if args.explain or not kind.ok]
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        for server in servers:
            print(f"{server.name} log, last lines:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if own_data_dir and not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)

    report = summarize(args, plan, prepared, counts, kinds, runs, ct, data_dir, own_data_dir)
    report["machine"]["loadavg_1min_before_after"] = [round(load_before[0], 2), round(load_after[0], 2)]
    print_report(report, kinds)
    if plans:
        print("\nquery plans (EXPLAIN QUERY PLAN of plan_query's SQL, first timed identifier"
              f"{'' if args.explain else ', kinds that missed their target'}):")
        print("\n".join(plans))
    report["plans"] = plans
    if own_data_dir and args.keep:
        print(f"\ndata dir kept: {data_dir} (reuse it with --data-dir)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def summarize(args, plan: Plan, prepared: dict, counts: dict, kinds: list[Kind], runs: dict, ct: dict,
              data_dir: Path, own_data_dir: bool) -> dict:
    def throughput(name: str) -> dict:
        seconds = statistics.median(s for s, _ in runs[name])
        return {"objects": ct["objects"], "bytes": ct["bytes"], "seconds_median": round(seconds, 4),
                "seconds": [round(s, 4) for s, _ in runs[name]],
                "seconds_best": round(min(s for s, _ in runs[name]), 4),
                "objects_per_second": round(ct["objects"] / seconds, 1),
                "mb_per_second": round(ct["bytes"] / 1e6 / seconds, 1),
                "sender_cpu_seconds_median": round(statistics.median(c for _, c in runs[name]), 3)}

    move, store, store_cli = throughput("move"), throughput("store"), throughput("store_cli")
    ratio = move["objects_per_second"] / store["objects_per_second"]
    return {
        "benchmark": "query",
        "instances": plan.instances,
        "index": dict(counts, seed=plan.seed, load_seconds=prepared["load"]["seconds"],
                      reused=prepared["reused"], bytes=prepared["load"]["bytes"],
                      data_dir=None if own_data_dir and not args.keep else str(data_dir)),
        "queries_per_kind": args.queries,
        "warmup": args.warmup,
        "find": {
            kind.name: {
                "label": kind.label,
                "p50_ms": round(kind.p50, 3),
                "p99_ms": round(kind.p(99), 3),
                "mean_ms": round(statistics.fmean(kind.latencies) * 1000, 3),
                "matches_min": min(kind.matches),
                "matches_median": statistics.median(kind.matches),
                "matches_max": max(kind.matches),
                "server_cpu_ms_per_query": round(sum(kind.server_cpu) / len(kind.latencies) * 1000, 3),
                # The slowest query, and the server CPU it took: a long wait with little CPU
                # is the scheduler (a busy machine), not the server.
                "slowest_ms": round(max(kind.latencies) * 1000, 3),
                "slowest_server_cpu_ms": round(
                    kind.server_cpu[kind.latencies.index(max(kind.latencies))] * 1000, 3),
                "latencies_ms": [round(t * 1000, 3) for t in kind.latencies],
                "target": kind.target_text,
                "target_p50_ms": kind.target_ms,
                "ok": kind.ok,
            }
            for kind in kinds
        },
        "retrieve": {
            "rounds": args.rounds,
            "c_move": move,
            "c_store_scu": store,
            "dicomagent_store_command": store_cli,
            "ratio_move_over_store": round(ratio, 3),
            "target_ratio": 0.8,
            "ok": ratio >= 0.8,
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "sqlite": sqlite3.sqlite_version,
                    "storescp": storescp_version()},
    }


def print_report(report: dict, kinds: list[Kind]) -> None:
    index = report["index"]
    scaled = "" if report["instances"] >= 1_000_000 else "  (targets are set for 1,000,000 instances)"
    print(f"\nindex: {index['instances']:,} instances, {index['series']:,} series, {index['studies']:,} studies, "
          f"{index['patients']:,} patients; {index['bytes'] / 1e6:,.0f} MB, loaded in {index['load_seconds']:.1f} s"
          f"{' (reused)' if index['reused'] else ''}{scaled}")
    print(f"{'C-FIND (one association)':<32} {'n':>4} {'matches min/med/max':>20} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'srv CPU ms':>10}  target")
    for kind in kinds:
        r = report["find"][kind.name]
        matches = f"{r['matches_min']}/{r['matches_median']:g}/{r['matches_max']}"
        print(f"{kind.label:<32} {len(kind.latencies):>4} {matches:>20} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{r['server_cpu_ms_per_query']:>10.2f}  {r['target']:<12} {'ok' if r['ok'] else 'MISSED'}")
    retrieve = report["retrieve"]
    print(f"\n{'retrieve to storescp (median of ' + str(retrieve['rounds']) + ')':<44} {'seconds':>8} "
          f"{'objects/s':>10} {'MB/s':>8} {'best s':>7} {'sender CPU s':>12}")
    for key, label in (("c_move", "C-MOVE (dicomagent serve)"), ("c_store_scu", "C-STORE SCU (store_files)"),
                       ("dicomagent_store_command", "dicomagent store (command, start-up incl.)")):
        r = retrieve[key]
        print(f"{label:<44} {r['seconds_median']:>8.3f} {r['objects_per_second']:>10.1f} {r['mb_per_second']:>8.1f} "
              f"{r['seconds_best']:>7.3f} {r['sender_cpu_seconds_median']:>12.3f}")
    print(f"ratio C-MOVE / C-STORE SCU (objects/s, medians): {retrieve['ratio_move_over_store']:.2f}  "
          f"target >= 0.8  {'ok' if retrieve['ok'] else 'MISSED'}")
    load = report["machine"]["loadavg_1min_before_after"]
    print(f"load average (1 min) before / after the measurements: {load[0]} / {load[1]} "
          f"on {os.cpu_count()} CPUs; 'srv CPU ms' is the server's CPU per query, steadier than latency "
          f"on a busy machine, and so is the sender's CPU per run")


if __name__ == "__main__":
    sys.exit(main())
