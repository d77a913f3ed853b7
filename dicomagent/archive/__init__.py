"""The archive: stored objects on disk and their index.

Layout under the data dir::

    archive/<Study UID>/<Series UID>/<SOP Instance UID>.dcm   the objects (Part 10 files)
    tmp/                                                     data sets being received
                                                             (and empty *.spare files ready)
    index.sqlite                                             the index (SQLite, WAL)

A path is made from UIDs only after checking that they are UIDs (digits and
dots, at most 64 characters); anything else is replaced by a hash, so nothing
a peer sends can name a path.

Durability, in the order the worker does it for each stored object:

1. the temporary file is flushed (``fdatasync``, when ``storage.fsync`` is
   on; started on the flusher thread as the object reaches the worker, so
   that it runs while the worker parses the header);
2. the index row, which names the final path, is committed;
3. the file is renamed into place and its directory flushed;
4. only then is the C-STORE-RSP sent.

A crash before 2 leaves only a temporary file, removed at the next start; a
crash between 2 and 3 leaves an index row whose file is still in ``tmp/``:
the next start finishes the rename (``recover``). So an acknowledged object
is always on stable storage and the index never names a file that is not
there.

All file and index work happens on one worker thread, never on the event
loop; objects that arrive together are committed in one transaction.
"""

from __future__ import annotations

import collections
import concurrent.futures
import fcntl
import hashlib
import io
import logging
import os
import queue
import re
import sqlite3
import threading
import time
import zlib
from dataclasses import dataclass

import pydicom
from pydicom.errors import InvalidDicomError

from dicomagent.archive.header import record_from_head, uids_from_record
from dicomagent.archive.incoming import IncomingFile, create_temporary
from dicomagent.archive.index import InstanceRecord, SQLiteIndex
from dicomagent.archive.keys import (INDEXED_TAGS, INSTANCE_KEYS, PATIENT_KEYS, SERIES_KEYS,
                                     STUDY_KEYS)
from dicomagent.archive.structure import StructureError, check_structure
from dicomagent.archive.part10 import NotPart10Error, file_meta_information, read_file_meta

log = logging.getLogger("dicomagent.archive")

# C-STORE statuses of the seed's Table 67.
SUCCESS = 0x0000
WARNING_COERCED_MISMATCH = 0xB007
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")

#: Temporary files the worker keeps created ahead of the receiving side.
_SPARES = 4


def safe_uid(uid: str) -> str:
    """A path component for a UID: the UID itself when it is one, else a hash of it."""
    if len(uid) <= 64 and _UID.fullmatch(uid):
        return uid
    return "x" + hashlib.sha1(uid.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class StorageSettings:
    fsync: bool = True
    min_free_mb: int = 100
    on_duplicate: str = "keep"          # or "replace"
    accept_mismatch: bool = False


@dataclass(frozen=True)
class StoreResult:
    status: int
    comment: str = ""
    path: str = ""
    duplicate: bool = False


def _text(element) -> str:
    value = element.value
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


#: Index key tag -> (level, is a sequence), from the seed's tables (``keys``).
_KEY_LEVELS = {key.tag: (level, key.is_sequence)
               for level, keys in (("patient", PATIENT_KEYS), ("study", STUDY_KEYS),
                                   ("series", SERIES_KEYS), ("instance", INSTANCE_KEYS))
               for key in keys}


def record_from_dataset(ds: pydicom.Dataset) -> InstanceRecord:
    """Read the index's attributes of every level from a parsed data set.

    One pass over the data set's elements: text values for matching, DICOM
    JSON (PS3.18 F) for returning; each level's JSON also carries the
    Specific Character Set.
    """
    values = {"patient": {}, "study": {}, "series": {}, "instance": {}}
    attrs = {"patient": {}, "study": {}, "series": {}, "instance": {}}
    charset_json = None
    charset = ""
    for element in ds:
        tag = element.tag
        if tag == 0x00080005:
            charset_json = element.to_json_dict(None, 1 << 20)
            charset = _text(element)
            continue
        found = _KEY_LEVELS.get(tag)
        if found is None:
            continue
        level, is_sequence = found
        attrs[level][f"{tag:08X}"] = element.to_json_dict(None, 1 << 20)
        if not is_sequence:
            values[level][element.keyword] = _text(element)
    if charset_json is not None:
        for level_attrs in attrs.values():
            if level_attrs:
                level_attrs["00080005"] = charset_json
    return InstanceRecord(values["patient"], values["study"], values["series"],
                          values["instance"], attrs["patient"], attrs["study"], attrs["series"],
                          attrs["instance"], charset)


def parse_incoming(incoming: IncomingFile) -> pydicom.Dataset:
    """Parse the header attributes of a received data set (pixel data not read).

    From the in-memory head when it holds them: either the whole data set is
    there, or pydicom stopped at the pixel data before the head's end. A head
    cut in the middle of the header is not trusted (pydicom would return a
    truncated last value without complaint): the file is read instead.
    """
    if incoming.size == incoming.data_offset:
        raise InvalidDicomError("empty data set")
    buffer = file_meta_information(incoming.sop_class_uid, incoming.sop_instance_uid,
                                   incoming.transfer_syntax) + bytes(incoming.head)
    source = io.BytesIO(buffer)
    ds = pydicom.dcmread(source, stop_before_pixels=True, specific_tags=list(INDEXED_TAGS))
    if incoming.complete_in_head or source.tell() < len(buffer):
        return ds
    return pydicom.dcmread(incoming.path, stop_before_pixels=True,
                           specific_tags=list(INDEXED_TAGS))


class _Job:
    __slots__ = ("incoming", "future", "result", "record", "final_path", "old_path", "flushed")

    def __init__(self, incoming: IncomingFile):
        self.incoming = incoming
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        #: The temporary file's ``fdatasync`` on the flusher thread, while it runs.
        self.flushed: concurrent.futures.Future | None = None
        self.result: StoreResult | None = None
        self.record: InstanceRecord | None = None
        self.final_path = ""
        self.old_path = ""


class _Call:
    __slots__ = ("function", "args", "future")

    def __init__(self, function, args, future):
        self.function = function
        self.args = args
        self.future = future

    def run(self, archive) -> None:
        try:
            result = self.function(archive, *self.args)
        except Exception as error:  # noqa: BLE001 - handed to the caller
            archive.index.rollback()
            _settle(self.future, exception=error)
        else:
            _settle(self.future, result=result)


class Archive:
    """The file store and the index, with the worker thread that writes both."""

    def __init__(self, data_dir: str, settings: StorageSettings = StorageSettings()):
        self.data_dir = os.path.abspath(data_dir)
        self.settings = settings
        self.tmp_dir = os.path.join(self.data_dir, "tmp")
        self.archive_dir = os.path.join(self.data_dir, "archive")
        os.makedirs(self.tmp_dir, exist_ok=True)
        os.makedirs(self.archive_dir, exist_ok=True)
        self.index = SQLiteIndex(os.path.join(self.data_dir, "index.sqlite"),
                                 durable=settings.fsync)
        self._free_checked_at = 0.0
        self._free_ok = True
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._spares: collections.deque[tuple[str, int]] = collections.deque()
        #: Queries run here, on their own read-only connection (WAL lets them
        #: read while the worker writes).
        self.reader = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                            thread_name_prefix="index-read")
        self._read_db: sqlite3.Connection | None = None
        #: With ``fsync`` on, received files are flushed here while the worker
        #: parses them: the flush of a small object takes about as long as
        #: the rest of its filing, and the two need not wait for each other.
        self._flusher = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="archive-flush") if settings.fsync else None
        # Only the first process on a data dir may clean tmp/: a daemon's data sets
        # in flight are there while `dicomagent ls` or `import` open the archive.
        self._lock = open(os.path.join(self.data_dir, "archive.lock"), "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        if alone:
            self.recover()
        fcntl.flock(self._lock, fcntl.LOCK_SH)
        self._worker = threading.Thread(target=self._work, name="archive", daemon=True)
        self._worker.start()

    # --- receiving (event loop thread) ---------------------------------------------------

    def has_room(self) -> bool:
        """Free space above ``min_free_mb`` (checked at most once a second)."""
        now = time.monotonic()
        if now - self._free_checked_at >= 1.0:
            stat = os.statvfs(self.data_dir)
            self._free_ok = stat.f_bavail * stat.f_frsize >= self.settings.min_free_mb * 2**20
            self._free_checked_at = now
        return self._free_ok

    def open_incoming(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                      calling_ae_title: str) -> IncomingFile:
        """The sink for one C-STORE data set (refused at once when space is short).

        Creating a file costs a good part of a small object's time, so the
        worker keeps a few created ahead (``_SPARES``) and the receiving side
        takes one of those when it can.
        """
        if not self.has_room():
            return IncomingFile.refused("out-of-resources")
        try:
            spare = self._spares.popleft()
        except IndexError:
            spare = None
        return IncomingFile(self.tmp_dir, sop_class_uid, sop_instance_uid, transfer_syntax,
                            calling_ae_title, time.time(), spare)

    def _refill_spares(self) -> None:
        """On the worker: create temporary files ahead for ``open_incoming``."""
        try:
            while len(self._spares) < _SPARES:
                self._spares.append(create_temporary(self.tmp_dir, ".spare"))
        except OSError as error:
            log.warning("cannot create temporary files ahead: %s", error.strerror)

    def submit(self, incoming: IncomingFile) -> concurrent.futures.Future:
        """Hand a complete data set to the worker; the future gives a ``StoreResult``."""
        job = _Job(incoming)
        self._queue.put(job)
        return job.future

    # --- the worker thread ---------------------------------------------------------------

    def call(self, function, *args) -> concurrent.futures.Future:
        """Run ``function(index, *args)`` on the worker thread, in order with the stores.

        For everything else that writes the index (storage commitment, retention):
        the index has one writer.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Call(function, args, future))
        return future

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if type(job) is _Call:
                job.run(self)
                continue
            batch = [job]
            while len(batch) < 64:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None or type(more) is _Call:
                    self._store_batch(batch)
                    batch = []
                    if more is None:
                        self._queue.put(None)
                        return
                    more.run(self)
                    break
                batch.append(more)
            if batch:
                self._store_batch(batch)
            self._refill_spares()

    def _store_batch(self, batch: list[_Job]) -> None:
        if self._flusher is not None:
            for job in batch:
                if job.incoming.fd >= 0:
                    job.flushed = self._flusher.submit(os.fdatasync, job.incoming.fd)
        accepted = []
        for job in batch:
            try:
                job.result = self._check(job)
            except Exception as error:  # noqa: BLE001 - one bad object must not stop the worker
                log.exception("storing %s failed", job.incoming.sop_instance_uid)
                job.result = StoreResult(CANNOT_UNDERSTAND, f"processing failure: {error}")
            if job.record is not None:
                accepted.append(job)
            else:
                try:
                    _wait_flushed(job)      # never close a file the flusher is still syncing
                except OSError:
                    pass                    # refused anyway
                job.incoming.discard()
        if accepted:
            try:
                for job in accepted:
                    self.index.add(job.record)
                self.index.commit()
                directories = set()
                for job in accepted:
                    directories.update(self._place(job))
                if self.settings.fsync:
                    for directory in directories:
                        _fsync_directory(directory)
            except Exception as error:  # noqa: BLE001 - disk or database failure
                log.error("archive write failed: %s", error)
                self.index.rollback()
                for job in accepted:
                    if job.incoming.path:          # not renamed into place
                        self.index.remove(job.record.sop_instance_uid)
                self.index.commit()
                for job in accepted:
                    if job.incoming.path:          # only what is not in place failed
                        job.incoming.discard()
                        job.result = StoreResult(OUT_OF_RESOURCES,
                                                 f"archive write failed: {error}")
        for job in batch:
            _settle(job.future, result=job.result)

    def _check(self, job: _Job) -> StoreResult:
        """Parse, compare with the command, decide duplicates, flush: the object's status."""
        incoming = job.incoming
        if incoming.failure:
            return StoreResult(OUT_OF_RESOURCES, incoming.failure)
        head = bytes(incoming.head)
        try:
            record = None
            if incoming.size > incoming.data_offset:
                record = record_from_head(head, incoming.transfer_syntax,
                                          complete=incoming.complete_in_head)
            if record is None:
                record = record_from_dataset(parse_incoming(incoming))
            sop_class, sop_instance, study_uid, series_uid = uids_from_record(record)
        except Exception as error:  # noqa: BLE001 - whatever pydicom says of bad bytes
            log.warning("C-STORE %s from %s: data set cannot be parsed: %s",
                        incoming.sop_instance_uid, incoming.calling_ae_title, error)
            return StoreResult(CANNOT_UNDERSTAND, f"cannot parse the data set: {error}")
        try:
            check_structure(head, incoming.size - incoming.data_offset,
                            incoming.transfer_syntax, incoming.path, incoming.data_offset)
        except (StructureError, OSError) as error:
            log.warning("C-STORE %s from %s: malformed data set: %s",
                        incoming.sop_instance_uid, incoming.calling_ae_title, error)
            return StoreResult(CANNOT_UNDERSTAND, f"malformed data set: {error}")
        if not (sop_instance and study_uid and series_uid and sop_class):
            return StoreResult(CANNOT_UNDERSTAND, "SOP Class/Instance, Study or Series "
                                                  "Instance UID missing in the data set")
        status, comment = SUCCESS, ""
        if sop_class != incoming.sop_class_uid or sop_instance != incoming.sop_instance_uid:
            comment = (f"data set is {sop_class} / {sop_instance}, command says "
                       f"{incoming.sop_class_uid} / {incoming.sop_instance_uid}")
            if not self.settings.accept_mismatch:
                log.warning("C-STORE from %s refused: %s", incoming.calling_ae_title, comment)
                return StoreResult(DATA_SET_DOES_NOT_MATCH, comment)
            status = WARNING_COERCED_MISMATCH
            _wait_flushed(job)              # the copy replaces the file being flushed
            self._rewrite_header(incoming, sop_class, sop_instance)
        existing = self.index.lookup(sop_instance)
        relative = os.path.join("archive", safe_uid(study_uid), safe_uid(series_uid),
                                safe_uid(sop_instance) + ".dcm")
        if existing is not None:
            if self.settings.on_duplicate == "keep":
                log.info("C-STORE %s from %s: already stored, kept the first copy",
                         sop_instance, incoming.calling_ae_title)
                return StoreResult(SUCCESS, "duplicate SOP Instance UID: first copy kept",
                                   existing["path"], duplicate=True)
            if existing["path"] != relative:
                job.old_path = existing["path"]
        if self.settings.fsync:
            # Data and size; the mtime need not wait. Step 1 ends here, before the commit.
            if job.flushed is not None:
                _wait_flushed(job)
            else:
                os.fdatasync(incoming.fd)
        os.close(incoming.fd)
        incoming.fd = -1
        record.path = relative
        record.size = incoming.size
        record.transfer_syntax = incoming.transfer_syntax
        record.received_at = incoming.received_at
        record.calling_ae_title = incoming.calling_ae_title
        record.crc32 = incoming.crc32
        job.record = record
        job.final_path = os.path.join(self.data_dir, relative)
        return StoreResult(status, comment, relative, duplicate=existing is not None)

    def _rewrite_header(self, incoming: IncomingFile, sop_class: str, sop_instance: str) -> None:
        """Give a mismatching data set (stored with B007) a header naming its own UIDs."""
        new = IncomingFile(self.tmp_dir, sop_class, sop_instance, incoming.transfer_syntax,
                           incoming.calling_ae_title, incoming.received_at)
        with open(incoming.path, "rb") as source:
            source.seek(incoming.data_offset)
            while chunk := source.read(1 << 20):
                new.write(chunk)
        incoming.discard()
        for name in IncomingFile.__slots__:
            setattr(incoming, name, getattr(new, name))

    def _place(self, job: _Job) -> list[str]:
        """Rename the flushed temporary file to its final path; return the directories
        whose entries changed (to flush): its own, and the parent of each it had to make."""
        directory = os.path.dirname(job.final_path)
        changed = [directory]
        try:
            os.replace(job.incoming.path, job.final_path)
        except FileNotFoundError:           # the series' first object: make its directories
            missing = directory
            while not os.path.isdir(missing):
                changed.append(os.path.dirname(missing))
                missing = os.path.dirname(missing)
            os.makedirs(directory, exist_ok=True)
            os.replace(job.incoming.path, job.final_path)
        job.incoming.path = ""
        if job.old_path:
            try:
                os.unlink(os.path.join(self.data_dir, job.old_path))
            except FileNotFoundError:
                pass
        return changed

    # --- storage commitment and retention (on the worker thread, through ``call``) -----------

    def verify(self, sop_class_uid: str, sop_instance_uid: str) -> int:
        """PS3.4 J.3.3: can the archive commit to this instance? 0, or a Failure Reason.

        0x0112 no such object instance; 0x0119 class/instance conflict; 0x0110
        processing failure (file missing, unreadable, or not what was received:
        its CRC-32 no longer matches the one kept at store time).
        """
        row = self.index.lookup(sop_instance_uid)
        if row is None:
            return 0x0112
        if row["SOPClassUID"] != sop_class_uid:
            return 0x0119
        path = os.path.join(self.data_dir, row["path"])
        try:
            if os.path.getsize(path) != row["size"] or _crc32(path) != row["crc32"]:
                log.warning("storage commitment: %s differs from what was stored", row["path"])
                return 0x0110
        except OSError as error:
            log.warning("storage commitment: %s unreadable: %s", row["path"], error.strerror)
            return 0x0110
        return 0

    def delete(self, sop_instance_uid: str) -> bool:
        """Remove an instance, file and index rows together (crash-safe).

        The file is first renamed into ``tmp/`` (where ``recover`` puts it
        back if the index row survives a crash), then the row is deleted and
        committed, then the file is removed.
        """
        row = self.index.lookup(sop_instance_uid)
        if row is None:
            return False
        path = os.path.join(self.data_dir, row["path"])
        parked = os.path.join(self.tmp_dir, f"{safe_uid(sop_instance_uid)}.deleting")
        try:
            os.replace(path, parked)
        except FileNotFoundError:
            parked = ""
        self.index.remove(sop_instance_uid)
        self.index.commit()
        if parked:
            os.unlink(parked)
        return True

    # --- start-up and shutdown -------------------------------------------------------------

    def recover(self) -> None:
        """Finish or drop what a crash left in ``tmp/`` (see the module docstring)."""
        for name in os.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, name)
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=[0x00080018])
                row = self.index.lookup(str(ds.get("SOPInstanceUID", "")))
            except Exception:  # noqa: BLE001 - a partial file is expected here
                row = None
            if row is not None:
                final = os.path.join(self.data_dir, row["path"])
                if os.path.getsize(path) == row["size"] and _crc32(path) == row["crc32"]:
                    os.makedirs(os.path.dirname(final), exist_ok=True)
                    os.replace(path, final)
                    log.info("recovered %s (stored before a crash)", row["path"])
                    continue
            os.unlink(path)
            log.info("removed %s (incomplete when the agent stopped)", name)

    # --- queries (on the reader thread) ----------------------------------------------------

    def execute(self, sql: str, params: list) -> sqlite3.Cursor:
        """Run a query on the read connection (call on ``self.reader``)."""
        if self._read_db is None:
            self._read_db = sqlite3.connect(self.index.path, check_same_thread=False)
            self._read_db.execute("PRAGMA query_only=ON")
        return self._read_db.execute(sql, params)

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join()
        if self._flusher is not None:
            self._flusher.shutdown(wait=True)
        while self._spares:
            path, fd = self._spares.popleft()
            os.close(fd)
            os.unlink(path)
        self.reader.shutdown(wait=True)
        if self._read_db is not None:
            self._read_db.close()
        self.index.close()
        self._lock.close()

    # --- import from disk --------------------------------------------------------------------

    def import_file(self, path: str, calling_ae_title: str = "") -> StoreResult:
        """Add a Part 10 file from disk through the same checks as a C-STORE."""
        try:
            with open(path, "rb") as handle:
                meta, data_offset = read_file_meta(handle)
                incoming = self.open_incoming(meta.get("sop_class_uid", ""),
                                              meta.get("sop_instance_uid", ""),
                                              meta["transfer_syntax"], calling_ae_title)
                handle.seek(data_offset)
                while chunk := handle.read(1 << 20):
                    incoming.write(chunk)
        except (NotPart10Error, OSError) as error:
            return StoreResult(CANNOT_UNDERSTAND, f"not a DICOM Part 10 file: {error}")
        return self.submit(incoming).result()


def _settle(future: concurrent.futures.Future, result=None, exception=None) -> None:
    """Give a caller its result, unless it stopped waiting (a cancelled future must not
    take the worker thread down)."""
    if not future.set_running_or_notify_cancel():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)


def _wait_flushed(job: _Job) -> None:
    """Wait for the job's ``fdatasync`` on the flusher thread, if one runs; raise its error."""
    flushed, job.flushed = job.flushed, None
    if flushed is not None:
        flushed.result()


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc
