"""The workflow store: worklist items, procedure steps, and the outbox.

Tables in the index database (``index.sqlite`` of the data dir), on a
connection of their own:

- ``worklist``: scheduled work items (PS3.4 Annex K, Modality Worklist), one
  row per Scheduled Procedure Step, with a column per matching key (see
  ``dicomagent.archive.worklist``) and the item as DICOM JSON packed with
  msgpack (``attrs``);
- ``mpps``: Modality Performed Procedure Step instances (PS3.4 Annex F), the
  current attributes as DICOM JSON, and the worklist rows they performed;
- ``gpsps`` / ``gppps``: General Purpose Scheduled and Performed Procedure
  Steps (PS3.4 2003); a scheduled step is on the General Purpose Worklist
  while ``listed``;
- ``outbox``: messages that must reach another node (MPPS forwarding), in the
  order they were accepted, kept until the peer has answered.

Every change is one transaction, committed (with ``synchronous=FULL``) before
the caller answers its peer: what was acknowledged survives a crash. A
``WorkflowStore`` is used from one thread at a time (the daemon's workflow
thread, or a command of the CLI); other processes on the same data dir see
its changes at their next query.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

import msgpack

from dicomagent.archive.worklist import COLUMNS as WORKLIST_COLUMNS
from dicomagent.archive.worklist import GP_COLUMNS, Model


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(blob: bytes):
    return msgpack.unpackb(blob, raw=False)


class UnknownInstance(LookupError):
    """No MPPS instance with that SOP Instance UID."""


class DuplicateInstance(ValueError):
    """An MPPS instance with that SOP Instance UID exists already."""


@dataclass
class Outgoing:
    """A message to queue for a peer (``message`` is "N-CREATE" or "N-SET")."""

    peer: str
    message: str
    sop_class_uid: str
    sop_instance_uid: str
    data_set: dict               # DICOM JSON


@dataclass
class OutboxMessage:
    """One message waiting for its peer."""

    seq: int
    peer: str
    message: str                 # "N-CREATE" or "N-SET"
    sop_class_uid: str
    sop_instance_uid: str
    data_set: dict               # DICOM JSON
    attempts: int
    next_attempt: float
    last_error: str
    state: str                   # "waiting" or "failed"
    created_at: float


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS worklist (
    item_id INTEGER PRIMARY KEY AUTOINCREMENT,      -- never reused: MPPS rows keep ids
    {", ".join(f"{column} TEXT NOT NULL DEFAULT ''" for column in WORKLIST_COLUMNS)},
    attrs BLOB NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    added_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS worklist_date ON worklist (ScheduledProcedureStepStartDate);
CREATE INDEX IF NOT EXISTS worklist_study ON worklist (StudyInstanceUID);
CREATE TABLE IF NOT EXISTS mpps (
    sop_instance_uid TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    attrs BLOB NOT NULL,
    worklist_items BLOB NOT NULL,
    calling_ae_title TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS gpsps (
    sop_instance_uid TEXT PRIMARY KEY,
    {", ".join(f"{column} TEXT NOT NULL DEFAULT ''" for column in GP_COLUMNS
               if column != "SOPInstanceUID")},
    SOPInstanceUID TEXT GENERATED ALWAYS AS (sop_instance_uid) VIRTUAL,
    transaction_uid TEXT NOT NULL DEFAULT '',
    listed INTEGER NOT NULL DEFAULT 1,
    attrs BLOB NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS gppps (
    sop_instance_uid TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    attrs BLOB NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    peer TEXT NOT NULL,
    message TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    data_set BLOB NOT NULL,
    state TEXT NOT NULL DEFAULT 'waiting',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
"""


class WorkflowStore:
    """Worklist, MPPS instances and outbox on one SQLite connection."""

    def __init__(self, path: str):
        self.path = path
        self.db = sqlite3.connect(path, timeout=30.0, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def _transaction(self):
        return _Transaction(self.db)

    # --- worklist ----------------------------------------------------------------------

    def add_worklist_items(self, items: list[tuple[dict, dict, str]]) -> list[int]:
        """Add (columns, DICOM JSON, source) items in one transaction; their ids."""
        ids = []
        names = list(WORKLIST_COLUMNS)
        sql = (f"INSERT INTO worklist ({', '.join(names)}, attrs, source, added_at) "
               f"VALUES ({', '.join('?' * (len(names) + 3))})")
        now = time.time()
        with self._transaction():
            for columns, attrs, source in items:
                cursor = self.db.execute(sql, [columns.get(name, "") for name in names]
                                         + [pack(attrs), source, now])
                ids.append(cursor.lastrowid)
        return ids

    def remove_worklist_items(self, item_ids: list[int]) -> int:
        """Remove items by id; how many there were."""
        with self._transaction():
            removed = 0
            for item_id in item_ids:
                removed += self.db.execute("DELETE FROM worklist WHERE item_id = ?",
                                           (item_id,)).rowcount
        return removed

    def worklist_items(self) -> list[tuple[int, dict, str, float]]:
        """Every item: (id, DICOM JSON, source, added_at), oldest first."""
        rows = self.db.execute("SELECT item_id, attrs, source, added_at FROM worklist "
                               "ORDER BY item_id").fetchall()
        return [(item_id, unpack(attrs), source, added_at)
                for item_id, attrs, source, added_at in rows]

    def query_worklist(self, where: str, params: list, model: Model | None = None
                       ) -> list[tuple[int, dict]]:
        """Items whose columns satisfy ``where`` (built by ``worklist.plan``): (key, attrs)."""
        if model is None or model.table == "worklist":
            sql = (f"SELECT item_id, attrs FROM worklist WHERE {where} ORDER BY "
                   f"ScheduledProcedureStepStartDate, ScheduledProcedureStepStartTime, item_id")
        else:
            sql = (f"SELECT sop_instance_uid, attrs FROM {model.table} WHERE listed = 1 AND "
                   f"({where}) ORDER BY {model.order_by}")
        return [(key, unpack(attrs)) for key, attrs in self.db.execute(sql, params).fetchall()]

    def find_scheduled(self, reference: dict[str, str]) -> list[tuple[int, dict]]:
        """Items whose Study Instance UID, Accession Number, Requested Procedure ID and
        Scheduled Procedure Step ID equal those given (empty ones are not compared)."""
        conditions, params = [], []
        for column, value in reference.items():
            if value:
                conditions.append(f"{column} = ?")
                params.append(value)
        if not conditions:
            return []
        return self.query_worklist(" AND ".join(conditions), params)

    # --- MPPS ----------------------------------------------------------------------------

    def create_mpps(self, sop_instance_uid: str, status: str, attrs: dict,
                    worklist_items: list[int], calling_ae_title: str,
                    outbox: list[Outgoing]) -> None:
        """A new MPPS instance, and its forwarding messages, in one transaction."""
        now = time.time()
        with self._transaction():
            exists = self.db.execute("SELECT 1 FROM mpps WHERE sop_instance_uid = ?",
                                     (sop_instance_uid,)).fetchone()
            if exists:
                raise DuplicateInstance(sop_instance_uid)
            self.db.execute("INSERT INTO mpps VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (sop_instance_uid, status, pack(attrs), pack(worklist_items),
                             calling_ae_title, now, now))
            self._enqueue(outbox, now)

    def get_mpps(self, sop_instance_uid: str) -> tuple[str, dict, list[int]]:
        """(status, DICOM JSON, worklist item ids) of an instance; ``UnknownInstance``."""
        row = self.db.execute("SELECT status, attrs, worklist_items FROM mpps "
                              "WHERE sop_instance_uid = ?", (sop_instance_uid,)).fetchone()
        if row is None:
            raise UnknownInstance(sop_instance_uid)
        return row[0], unpack(row[1]), unpack(row[2])

    def set_mpps(self, sop_instance_uid: str, status: str, attrs: dict,
                 remove_worklist_items: list[int],
                 outbox: list[Outgoing]) -> None:
        """Update an instance; remove the worklist items it completed; queue forwarding."""
        now = time.time()
        with self._transaction():
            self.db.execute("UPDATE mpps SET status = ?, attrs = ?, updated_at = ? "
                            "WHERE sop_instance_uid = ?",
                            (status, pack(attrs), now, sop_instance_uid))
            for item_id in remove_worklist_items:
                self.db.execute("DELETE FROM worklist WHERE item_id = ?", (item_id,))
            self._enqueue(outbox, now)

    def mpps_instances(self) -> list[dict]:
        """Every instance: uid, status, attrs, calling AE, times; oldest first."""
        rows = self.db.execute("SELECT sop_instance_uid, status, attrs, calling_ae_title, "
                               "created_at, updated_at FROM mpps ORDER BY created_at").fetchall()
        return [{"sop_instance_uid": uid, "status": status, "attrs": unpack(attrs),
                 "calling_ae_title": calling, "created_at": created, "updated_at": updated}
                for uid, status, attrs, calling, created, updated in rows]

    def expire_mpps(self, updated_before: float) -> int:
        """Delete instances last changed before ``updated_before``; how many."""
        with self._transaction():
            return self.db.execute("DELETE FROM mpps WHERE updated_at < ?",
                                   (updated_before,)).rowcount

    # --- General Purpose Scheduled / Performed Procedure Steps ----------------------------

    def add_gpsps(self, steps: list[tuple[str, dict, dict]]) -> None:
        """New steps (SOP Instance UID, columns, DICOM JSON) in one transaction;
        ``DuplicateInstance`` (and nothing added) if one exists already."""
        names = [column for column in GP_COLUMNS if column != "SOPInstanceUID"]
        sql = (f"INSERT INTO gpsps (sop_instance_uid, {', '.join(names)}, attrs, created_at, "
               f"updated_at) VALUES ({', '.join('?' * (len(names) + 4))})")
        now = time.time()
        with self._transaction():
            for uid, columns, attrs in steps:
                if self.db.execute("SELECT 1 FROM gpsps WHERE sop_instance_uid = ?",
                                   (uid,)).fetchone():
                    raise DuplicateInstance(uid)
                self.db.execute(sql, [uid] + [columns.get(name, "") for name in names]
                                + [pack(attrs), now, now])

    def get_gpsps(self, uid: str) -> dict:
        """A step: status, transaction_uid, listed, attrs; ``UnknownInstance``."""
        row = self.db.execute("SELECT GeneralPurposeScheduledProcedureStepStatus, "
                              "transaction_uid, listed, attrs FROM gpsps "
                              "WHERE sop_instance_uid = ?", (uid,)).fetchone()
        if row is None:
            raise UnknownInstance(uid)
        return {"status": row[0], "transaction_uid": row[1], "listed": bool(row[2]),
                "attrs": unpack(row[3])}

    def _put_gpsps(self, uid: str, step: dict, now: float) -> None:
        self.db.execute("UPDATE gpsps SET GeneralPurposeScheduledProcedureStepStatus = ?, "
                        "transaction_uid = ?, listed = ?, attrs = ?, updated_at = ? "
                        "WHERE sop_instance_uid = ?",
                        (step["status"], step["transaction_uid"], int(step["listed"]),
                         pack(step["attrs"]), now, uid))

    def put_gpsps(self, uid: str, step: dict) -> None:
        """Write back a step read with ``get_gpsps`` and changed."""
        with self._transaction():
            self._put_gpsps(uid, step, time.time())

    def remove_gpsps(self, uids: list[str]) -> int:
        with self._transaction():
            return sum(self.db.execute("DELETE FROM gpsps WHERE sop_instance_uid = ?",
                                       (uid,)).rowcount for uid in uids)

    def gpsps_steps(self) -> list[dict]:
        rows = self.db.execute("SELECT sop_instance_uid, GeneralPurposeScheduledProcedureStepStatus, "
                               "transaction_uid, listed, attrs FROM gpsps "
                               "ORDER BY created_at").fetchall()
        return [{"sop_instance_uid": uid, "status": status, "transaction_uid": transaction,
                 "listed": bool(listed), "attrs": unpack(attrs)}
                for uid, status, transaction, listed, attrs in rows]

    def create_gppps(self, uid: str, status: str, attrs: dict,
                     steps: dict[str, dict]) -> None:
        """A new performed step and the scheduled steps it changes, in one transaction."""
        now = time.time()
        with self._transaction():
            if self.db.execute("SELECT 1 FROM gppps WHERE sop_instance_uid = ?",
                               (uid,)).fetchone():
                raise DuplicateInstance(uid)
            self.db.execute("INSERT INTO gppps VALUES (?, ?, ?, ?, ?)",
                            (uid, status, pack(attrs), now, now))
            for step_uid, step in steps.items():
                self._put_gpsps(step_uid, step, now)

    def get_gppps(self, uid: str) -> tuple[str, dict]:
        row = self.db.execute("SELECT status, attrs FROM gppps WHERE sop_instance_uid = ?",
                              (uid,)).fetchone()
        if row is None:
            raise UnknownInstance(uid)
        return row[0], unpack(row[1])

    def set_gppps(self, uid: str, status: str, attrs: dict) -> None:
        with self._transaction():
            self.db.execute("UPDATE gppps SET status = ?, attrs = ?, updated_at = ? "
                            "WHERE sop_instance_uid = ?", (status, pack(attrs), time.time(), uid))

    def gppps_instances(self) -> list[dict]:
        rows = self.db.execute("SELECT sop_instance_uid, status, attrs FROM gppps "
                               "ORDER BY created_at").fetchall()
        return [{"sop_instance_uid": uid, "status": status, "attrs": unpack(attrs)}
                for uid, status, attrs in rows]

    def expire_gp(self, updated_before: float) -> int:
        """Delete scheduled steps in a final state, and performed steps, last changed before."""
        with self._transaction():
            removed = self.db.execute(
                "DELETE FROM gpsps WHERE updated_at < ? AND "
                "GeneralPurposeScheduledProcedureStepStatus IN ('COMPLETED', 'DISCONTINUED')",
                (updated_before,)).rowcount
            removed += self.db.execute("DELETE FROM gppps WHERE updated_at < ?",
                                       (updated_before,)).rowcount
        return removed

    # --- outbox ------------------------------------------------------------------------

    def _enqueue(self, outbox: list[Outgoing], now: float) -> None:
        """Queue messages (inside the caller's transaction)."""
        for out in outbox:
            self.db.execute("INSERT INTO outbox (peer, message, sop_class_uid, sop_instance_uid, "
                            "data_set, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                            (out.peer, out.message, out.sop_class_uid, out.sop_instance_uid,
                             pack(out.data_set), now))

    def outbox(self, state: str | None = None) -> list[OutboxMessage]:
        """Messages in queue order (all, or those in ``state``)."""
        sql = ("SELECT seq, peer, message, sop_class_uid, sop_instance_uid, data_set, attempts, "
               "next_attempt, last_error, state, created_at FROM outbox")
        params: tuple = ()
        if state is not None:
            sql += " WHERE state = ?"
            params = (state,)
        rows = self.db.execute(sql + " ORDER BY seq", params).fetchall()
        return [OutboxMessage(seq, peer, message, sop_class, sop_instance, unpack(data_set),
                              attempts, next_attempt, last_error, row_state, created_at)
                for (seq, peer, message, sop_class, sop_instance, data_set, attempts,
                     next_attempt, last_error, row_state, created_at) in rows]

    def outbox_delivered(self, seq: int) -> None:
        with self._transaction():
            self.db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def outbox_failed(self, seq: int, error: str) -> None:
        """The peer refused the message: kept, marked failed, not tried again."""
        with self._transaction():
            self.db.execute("UPDATE outbox SET state = 'failed', last_error = ?, "
                            "attempts = attempts + 1 WHERE seq = ?", (error, seq))

    def outbox_retry(self, peer: str, next_attempt: float, error: str) -> None:
        """The peer could not be reached: its waiting messages wait until ``next_attempt``."""
        with self._transaction():
            self.db.execute("UPDATE outbox SET attempts = attempts + 1, next_attempt = ?, "
                            "last_error = ? WHERE peer = ? AND state = 'waiting'",
                            (next_attempt, error, peer))


class _Transaction:
    """``with`` block: BEGIN IMMEDIATE … COMMIT, or ROLLBACK on an exception."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, traceback):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False
