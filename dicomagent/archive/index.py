"""The index of stored objects: one row per patient, study, series and instance.

``Index`` is the small interface the rest of the agent uses; ``SQLiteIndex``
implements it with the standard library's sqlite3 (WAL mode, in the data
dir). Another backend (PostgreSQL, for several daemons sharing one index)
implements the same methods.

Each level's row has one column per key of the seed's query tables (named by
the attribute keyword, holding the value as text), and an ``attrs`` column:
the level's attributes as DICOM JSON (PS3.18 Annex F) packed with msgpack,
sequences included, so a query can return them without opening a file.

An index is used from one thread at a time (the archive's worker thread).

References
----------
Seed Tables 41-48; PS3.18 Annex F (DICOM JSON model).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from dicomagent.archive.keys import INSTANCE_KEYS, PATIENT_KEYS, SERIES_KEYS, STUDY_KEYS


@dataclass
class InstanceRecord:
    """What the index keeps of one stored instance, level by level.

    ``patient`` … ``instance`` map keyword -> text value (for matching);
    ``*_attrs`` are DICOM JSON dicts of the level's attributes (for returning).
    """

    patient: dict[str, str]
    study: dict[str, str]
    series: dict[str, str]
    instance: dict[str, str]
    patient_attrs: dict = field(default_factory=dict)
    study_attrs: dict = field(default_factory=dict)
    series_attrs: dict = field(default_factory=dict)
    instance_attrs: dict = field(default_factory=dict)
    specific_character_set: str = ""
    path: str = ""
    size: int = 0
    transfer_syntax: str = ""
    received_at: float = 0.0
    calling_ae_title: str = ""
    crc32: int = 0

    @property
    def sop_instance_uid(self) -> str:
        return self.instance["SOPInstanceUID"]

    @classmethod
    def of_levels(cls, values: dict, attrs: dict, charset: str,
                  charset_json: dict | None) -> "InstanceRecord":
        """A record from per-level text values and DICOM JSON attributes (keys "patient"
        … "instance"); each level's JSON that has attributes also gets the Specific
        Character Set (``charset_json``, when the data set has one)."""
        if charset_json is not None:
            for level_attrs in attrs.values():
                if level_attrs:
                    level_attrs["00080005"] = charset_json
        return cls(values["patient"], values["study"], values["series"], values["instance"],
                   attrs["patient"], attrs["study"], attrs["series"], attrs["instance"],
                   charset)


class Index:
    """The interface every index backend implements."""

    def lookup(self, sop_instance_uid: str) -> dict | None:
        """The instance's file facts (path, size, crc32, transfer_syntax…), or None."""
        raise NotImplementedError

    def add(self, record: InstanceRecord, replacing: bool | None = None) -> None:
        """Insert or replace the instance and update its patient, study and series.

        ``replacing``: whether the index lists the instance already, when the
        caller has just looked (None: the index looks).
        """
        raise NotImplementedError

    def remove(self, sop_instance_uid: str) -> None:
        """Remove an instance; series, study and patient rows left empty go too."""
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def rollback(self) -> None:
        raise NotImplementedError

    # Storage commitment (PS3.4 Annex J) and retention: see ``SQLiteIndex`` for each.

    def add_commitment(self, transaction_uid: str, calling_ae_title: str, received_at: float,
                       references: list[tuple[str, str]]) -> None:
        raise NotImplementedError

    def set_commitment_result(self, transaction_uid: str, committed: list, failed: list,
                              now: float) -> None:
        raise NotImplementedError

    def commitment_reported(self, transaction_uid: str) -> None:
        raise NotImplementedError

    def commitment_retry(self, transaction_uid: str, next_attempt: float, error: str) -> None:
        raise NotImplementedError

    def commitments(self, state: str | None = "pending") -> list[dict]:
        raise NotImplementedError

    def expired(self, received_before: float, calling_ae_titles: list[str] | None = None,
                only_committed: bool = False) -> list[str]:
        raise NotImplementedError

    def list(self, level: str) -> list[dict]:
        """Rows for ``dicomagent ls``: level is "study", "series" or "instance"."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _columns(keys) -> list[str]:
    return [key.keyword for key in keys if not key.is_sequence]


PATIENT_COLUMNS = _columns(PATIENT_KEYS)
STUDY_COLUMNS = _columns(STUDY_KEYS)
SERIES_COLUMNS = _columns(SERIES_KEYS)
INSTANCE_COLUMNS = _columns(INSTANCE_KEYS)
FILE_COLUMNS = ["path", "size", "transfer_syntax", "received_at", "calling_ae_title", "crc32"]


def _ddl() -> str:
    def cols(names):
        return "".join(f",\n    {name} TEXT" for name in names)

    return f"""
CREATE TABLE IF NOT EXISTS patients (
    patient_key INTEGER PRIMARY KEY{cols(c for c in PATIENT_COLUMNS if c != 'PatientID')},
    PatientID TEXT NOT NULL UNIQUE,
    attrs BLOB
);
CREATE TABLE IF NOT EXISTS studies (
    StudyInstanceUID TEXT PRIMARY KEY,
    patient_key INTEGER NOT NULL REFERENCES patients(patient_key){cols(c for c in STUDY_COLUMNS if c != 'StudyInstanceUID')},
    SpecificCharacterSet TEXT,
    attrs BLOB
);
CREATE TABLE IF NOT EXISTS series (
    SeriesInstanceUID TEXT PRIMARY KEY,
    StudyInstanceUID TEXT NOT NULL REFERENCES studies(StudyInstanceUID){cols(c for c in SERIES_COLUMNS if c != 'SeriesInstanceUID')},
    attrs BLOB
);
CREATE TABLE IF NOT EXISTS instances (
    SOPInstanceUID TEXT PRIMARY KEY,
    SeriesInstanceUID TEXT NOT NULL REFERENCES series(SeriesInstanceUID),
    StudyInstanceUID TEXT NOT NULL{cols(c for c in INSTANCE_COLUMNS if c != 'SOPInstanceUID')},
    attrs BLOB,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    transfer_syntax TEXT NOT NULL,
    received_at REAL NOT NULL,
    calling_ae_title TEXT,
    crc32 INTEGER,
    committed_at REAL
);
CREATE TABLE IF NOT EXISTS commitments (
    transaction_uid TEXT PRIMARY KEY,
    calling_ae_title TEXT NOT NULL,
    received_at REAL NOT NULL,
    request BLOB NOT NULL,
    result BLOB,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS instances_received ON instances(received_at);
CREATE INDEX IF NOT EXISTS patients_name ON patients(PatientName);
CREATE INDEX IF NOT EXISTS studies_patient ON studies(patient_key);
CREATE INDEX IF NOT EXISTS studies_date ON studies(StudyDate);
CREATE INDEX IF NOT EXISTS studies_accession ON studies(AccessionNumber);
CREATE INDEX IF NOT EXISTS series_study ON series(StudyInstanceUID);
CREATE INDEX IF NOT EXISTS instances_series ON instances(SeriesInstanceUID);
CREATE INDEX IF NOT EXISTS instances_study ON instances(StudyInstanceUID);
"""


def _pack(attrs: dict) -> bytes:
    return msgpack.packb(attrs, use_bin_type=True)


def unpack_attrs(blob: bytes | None) -> dict:
    return msgpack.unpackb(blob, raw=False) if blob else {}


class SQLiteIndex(Index):
    """``Index`` on SQLite: ``index.sqlite`` in the data dir, WAL journal.

    ``durable``: synchronous=FULL (every commit reaches stable storage);
    otherwise NORMAL (a crash of the process loses nothing, a power cut may
    lose the last commits).
    """

    def __init__(self, path: str | Path, durable: bool = True):
        self.path = str(path)
        self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self.db.execute("PRAGMA foreign_keys=OFF")
        self.db.executescript(_ddl())
        self._in_transaction = False
        #: The patient, study and series rows this index wrote last (see ``add``).
        self._last: dict = {}
        self._sql_patient = (
            f"INSERT INTO patients ({', '.join(PATIENT_COLUMNS)}, attrs) "
            f"VALUES ({', '.join('?' * (len(PATIENT_COLUMNS) + 1))}) "
            f"ON CONFLICT(PatientID) DO UPDATE SET "
            + ", ".join(f"{c}=excluded.{c}" for c in PATIENT_COLUMNS if c != "PatientID")
            + ", attrs=excluded.attrs RETURNING patient_key")
        self._sql_study = self._upsert("studies", ["StudyInstanceUID", "patient_key"]
                                       + [c for c in STUDY_COLUMNS if c != "StudyInstanceUID"]
                                       + ["SpecificCharacterSet", "attrs"], "StudyInstanceUID")
        self._sql_series = self._upsert("series", ["SeriesInstanceUID", "StudyInstanceUID"]
                                        + [c for c in SERIES_COLUMNS if c != "SeriesInstanceUID"]
                                        + ["attrs"], "SeriesInstanceUID")
        self._instance_columns = (["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"]
                                  + [c for c in INSTANCE_COLUMNS if c != "SOPInstanceUID"]
                                  + ["attrs"] + FILE_COLUMNS)
        self._sql_instance = self._upsert("instances", self._instance_columns, "SOPInstanceUID")

    @staticmethod
    def _upsert(table: str, columns: list[str], key: str) -> str:
        return (f"INSERT INTO {table} ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' * len(columns))}) ON CONFLICT({key}) DO UPDATE SET "
                + ", ".join(f"{c}=excluded.{c}" for c in columns if c != key))

    def _begin(self) -> None:
        if not self._in_transaction:
            self.db.execute("BEGIN IMMEDIATE")
            self._in_transaction = True
            # The upper levels repeat for every instance of a series: ``add`` writes
            # a row again only when it differs from the one this index wrote last,
            # and nobody else (``dicomagent import``, ``retention``) wrote in between.
            # From here to the commit nobody else can.
            (version,) = self.db.execute("PRAGMA data_version").fetchone()
            if version != self._last.get("data_version"):
                self._last.clear()
                self._last["data_version"] = version

    def commit(self) -> None:
        if self._in_transaction:
            self.db.execute("COMMIT")
            self._in_transaction = False

    def rollback(self) -> None:
        self._last.clear()
        if self._in_transaction:
            self.db.execute("ROLLBACK")
            self._in_transaction = False

    def lookup(self, sop_instance_uid: str) -> dict | None:
        row = self.db.execute(
            "SELECT path, size, crc32, transfer_syntax, SOPClassUID, StudyInstanceUID, "
            "SeriesInstanceUID FROM instances WHERE SOPInstanceUID = ?",
            (sop_instance_uid,)).fetchone()
        if row is None:
            return None
        return dict(zip(("path", "size", "crc32", "transfer_syntax", "SOPClassUID",
                         "StudyInstanceUID", "SeriesInstanceUID"), row))

    def add(self, record: InstanceRecord, replacing: bool | None = None) -> None:
        self._begin()
        db = self.db
        if replacing is None:
            replacing = db.execute("SELECT 1 FROM instances WHERE SOPInstanceUID = ?",
                                   (record.sop_instance_uid,)).fetchone() is not None
        if replacing:
            self.remove(record.sop_instance_uid)      # prunes the levels it leaves empty
        # A level's row is compared before its attributes are packed: (columns, attrs).
        patient = record.patient
        patient_row = ([patient.get(c) if c != "PatientID" else patient.get(c) or ""
                        for c in PATIENT_COLUMNS], record.patient_attrs)
        last = self._last
        if last.get("patient_row") == patient_row:
            patient_key = last["patient_key"]
        else:
            (patient_key,) = db.execute(self._sql_patient, patient_row[0]
                                        + [_pack(patient_row[1])]).fetchone()
            last["patient_row"], last["patient_key"] = patient_row, patient_key
        study = record.study
        study_uid = study["StudyInstanceUID"]
        study_row = ([study_uid, patient_key] + [
            study.get(c) for c in STUDY_COLUMNS if c != "StudyInstanceUID"] + [
            record.specific_character_set], record.study_attrs)
        if last.get("study_row") != study_row:
            db.execute(self._sql_study, study_row[0] + [_pack(study_row[1])])
            last["study_row"] = study_row
        series = record.series
        series_row = ([series["SeriesInstanceUID"], study_uid] + [
            series.get(c) for c in SERIES_COLUMNS if c != "SeriesInstanceUID"],
            record.series_attrs)
        if last.get("series_row") != series_row:
            db.execute(self._sql_series, series_row[0] + [_pack(series_row[1])])
            last["series_row"] = series_row
        instance = record.instance
        db.execute(self._sql_instance,
                   [instance["SOPInstanceUID"], series["SeriesInstanceUID"], study_uid]
                   + [instance.get(c) for c in INSTANCE_COLUMNS if c != "SOPInstanceUID"]
                   + [_pack(record.instance_attrs), record.path, record.size,
                      record.transfer_syntax, record.received_at, record.calling_ae_title,
                      record.crc32])

    def remove(self, sop_instance_uid: str) -> None:
        self._begin()
        self._last.clear()
        db = self.db
        row = db.execute("SELECT SeriesInstanceUID, StudyInstanceUID FROM instances "
                         "WHERE SOPInstanceUID = ?", (sop_instance_uid,)).fetchone()
        if row is None:
            return
        series_uid, study_uid = row
        db.execute("DELETE FROM instances WHERE SOPInstanceUID = ?", (sop_instance_uid,))
        db.execute("DELETE FROM series WHERE SeriesInstanceUID = ? AND NOT EXISTS "
                   "(SELECT 1 FROM instances WHERE SeriesInstanceUID = ?)", (series_uid, series_uid))
        db.execute("DELETE FROM studies WHERE StudyInstanceUID = ? AND NOT EXISTS "
                   "(SELECT 1 FROM series WHERE StudyInstanceUID = ?)", (study_uid, study_uid))
        db.execute("DELETE FROM patients WHERE NOT EXISTS "
                   "(SELECT 1 FROM studies WHERE studies.patient_key = patients.patient_key)")

    # --- storage commitment (PS3.4 Annex J) and retention ---------------------------------

    def add_commitment(self, transaction_uid: str, calling_ae_title: str, received_at: float,
                       references: list[tuple[str, str]]) -> None:
        """Record an N-ACTION request (durably, before it is answered)."""
        self._begin()
        self.db.execute(
            "INSERT INTO commitments (transaction_uid, calling_ae_title, received_at, request, "
            "state) VALUES (?, ?, ?, ?, 'pending') ON CONFLICT(transaction_uid) DO UPDATE SET "
            "calling_ae_title=excluded.calling_ae_title, received_at=excluded.received_at, "
            "request=excluded.request, result=NULL, state='pending', attempts=0, "
            "next_attempt=0, last_error=NULL",
            (transaction_uid, calling_ae_title, received_at,
             msgpack.packb([list(r) for r in references])))
        self.commit()

    def set_commitment_result(self, transaction_uid: str, committed: list, failed: list,
                              now: float) -> None:
        """The archive's answer: committed [class, instance] and failed [class, instance, reason]."""
        self._begin()
        self.db.execute("UPDATE commitments SET result = ? WHERE transaction_uid = ?",
                        (msgpack.packb({"committed": committed, "failed": failed}),
                         transaction_uid))
        self.db.executemany("UPDATE instances SET committed_at = ? WHERE SOPInstanceUID = ? "
                            "AND committed_at IS NULL", [(now, uid) for _, uid in committed])
        self.commit()

    def commitment_reported(self, transaction_uid: str) -> None:
        self._begin()
        self.db.execute("UPDATE commitments SET state = 'reported', last_error = NULL "
                        "WHERE transaction_uid = ?", (transaction_uid,))
        self.commit()

    def commitment_retry(self, transaction_uid: str, next_attempt: float, error: str) -> None:
        self._begin()
        self.db.execute("UPDATE commitments SET attempts = attempts + 1, next_attempt = ?, "
                        "last_error = ? WHERE transaction_uid = ?",
                        (next_attempt, error, transaction_uid))
        self.commit()

    def commitments(self, state: str | None = "pending") -> list[dict]:
        """Commitment requests (all, or in one state), oldest first, unpacked."""
        sql = ("SELECT transaction_uid, calling_ae_title, received_at, request, result, state, "
               "attempts, next_attempt, last_error FROM commitments")
        params: tuple = ()
        if state is not None:
            sql += " WHERE state = ?"
            params = (state,)
        rows = []
        for row in self.db.execute(sql + " ORDER BY received_at", params):
            record = dict(zip(("transaction_uid", "calling_ae_title", "received_at", "request",
                               "result", "state", "attempts", "next_attempt", "last_error"), row))
            record["request"] = msgpack.unpackb(record["request"])
            record["result"] = msgpack.unpackb(record["result"]) if record["result"] else None
            rows.append(record)
        return rows

    def expired(self, received_before: float, calling_ae_titles: list[str] | None = None,
                only_committed: bool = False) -> list[str]:
        """SOP Instance UIDs received before a time (the retention rule)."""
        sql = "SELECT SOPInstanceUID FROM instances WHERE received_at < ?"
        params: list = [received_before]
        if calling_ae_titles:
            sql += f" AND calling_ae_title IN ({', '.join('?' * len(calling_ae_titles))})"
            params += calling_ae_titles
        if only_committed:
            sql += " AND committed_at IS NOT NULL"
        return [uid for (uid,) in self.db.execute(sql + " ORDER BY received_at", params)]

    def list(self, level: str) -> list[dict]:
        queries = {
            "study": (
                "SELECT p.PatientID, p.PatientName, s.StudyDate, s.StudyInstanceUID, "
                "s.AccessionNumber, (SELECT GROUP_CONCAT(DISTINCT Modality) FROM series x "
                "WHERE x.StudyInstanceUID = s.StudyInstanceUID) AS ModalitiesInStudy, "
                "(SELECT COUNT(*) FROM series x WHERE x.StudyInstanceUID = s.StudyInstanceUID) "
                "AS NumberOfStudyRelatedSeries, (SELECT COUNT(*) FROM instances i WHERE "
                "i.StudyInstanceUID = s.StudyInstanceUID) AS NumberOfStudyRelatedInstances "
                "FROM studies s JOIN patients p USING (patient_key) "
                "ORDER BY s.StudyDate, s.StudyInstanceUID"),
            "series": (
                "SELECT x.StudyInstanceUID, x.SeriesInstanceUID, x.Modality, x.SeriesNumber, "
                "(SELECT COUNT(*) FROM instances i WHERE i.SeriesInstanceUID = "
                "x.SeriesInstanceUID) AS NumberOfSeriesRelatedInstances FROM series x "
                "ORDER BY x.StudyInstanceUID, CAST(x.SeriesNumber AS INTEGER)"),
            "instance": (
                "SELECT SeriesInstanceUID, SOPInstanceUID, SOPClassUID, InstanceNumber, "
                "transfer_syntax, size, path, calling_ae_title FROM instances "
                "ORDER BY SeriesInstanceUID, CAST(InstanceNumber AS INTEGER)"),
        }
        cursor = self.db.execute(queries[level])
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    def close(self) -> None:
        self.rollback()
        self.db.close()
