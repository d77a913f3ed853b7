"""The archive: stored objects on disk and their index.

Layout under the data dir::

    archive/<Study UID>/<Series UID>/<SOP Instance UID>.dcm   the objects (Part 10 files)
    tmp/                                                     data sets being received
                                                             (and empty *.spare files ready)
    index.sqlite                                             the index (SQLite, WAL)
    index.pending                                            present while objects may be
                                                             filed but not yet indexed

A path is made from UIDs only after checking that they are UIDs (digits and
dots, at most 64 characters); anything else is replaced by a hash, so nothing
a peer sends can name a path.

A received data set goes through two stages:

1. **Filing**, before the C-STORE-RSP. The element headers are walked
   (``check_structure``: every length must hold, which also yields the SOP
   Class, SOP Instance, Study and Series UIDs), the status is decided (seed
   Table 67), the temporary file is flushed (``fdatasync``, when
   ``storage.fsync`` is on), renamed to its final path, and that directory
   flushed. Only then is the response sent: an acknowledged object is on
   stable storage. With fsync off filing is a header walk and a rename, done
   on the event loop; with fsync on (or a deflated data set, or
   ``accept_mismatch``) it runs on a filer thread.
2. **Indexing**, after it, on the worker thread: the header attributes are
   parsed and written to the index, many objects per transaction. A query,
   a storage commitment or a deletion waits for the objects acknowledged
   before it (``caught_up``, ``call``). When indexing falls more than
   ``MAX_BACKLOG`` objects behind, responses wait for it (back-pressure).

The files are the truth, the index is derived from them. A crash leaves at
worst files in ``tmp/`` (removed at the next start: nothing acknowledged)
and filed objects whose index rows were not written yet: ``index.pending``
exists while a daemon runs, and its modification time is refreshed while
the index is caught up; a start that finds it re-reads every series
directory changed since then (``catch_up``) and indexes what is missing.

References
----------
Seed 3.1.3.4 and Table 67; PS3.4 Annex B; PS3.10 §7 (Part 10 files).
"""

from __future__ import annotations

import collections
import concurrent.futures
import fcntl
import errno
import hashlib
import io
import itertools
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


#: Transfer syntax whose data set is deflated (PS3.5 A.5): pydicom reads it.
DEFLATED = "1.2.840.10008.1.2.1.99"

#: The top-level elements filing needs: they name the object and its path.
SOP_CLASS, SOP_INSTANCE, STUDY, SERIES = 0x00080016, 0x00080018, 0x0020000D, 0x0020000E
_FILING_TAGS = frozenset((SOP_CLASS, SOP_INSTANCE, STUDY, SERIES))

#: Objects filed but not yet indexed beyond which responses wait for the index.
MAX_BACKLOG = 512

#: ``index.pending`` is refreshed at most this often (seconds), and a start
#: re-reads the series directories changed up to this long before its time.
PENDING_MARGIN = 60.0


def _uid_value(raw) -> str:
    return bytes(raw).rstrip(b"\x00 ").decode("ascii", "replace")


def parse_file(path: str) -> pydicom.Dataset:
    """The header attributes of a filed object, read by pydicom (pixel data not read)."""
    return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(INDEXED_TAGS))


def parse_incoming(incoming: IncomingFile) -> pydicom.Dataset:
    """Parse the header attributes of a received data set (pixel data not read).

    From the in-memory head when it holds the whole data set, else from the
    temporary file.
    """
    if incoming.complete_in_head:
        buffer = file_meta_information(incoming.sop_class_uid, incoming.sop_instance_uid,
                                       incoming.transfer_syntax) + bytes(incoming.head)
        return pydicom.dcmread(io.BytesIO(buffer), stop_before_pixels=True,
                               specific_tags=list(INDEXED_TAGS))
    return parse_file(incoming.path)


@dataclass(slots=True)
class _Filing:
    """A checked data set on its way to its final path, then to the index."""
    incoming: IncomingFile
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    relative: str
    final_path: str
    result: StoreResult
    rewrite: bool = False       # B007: the header must name the data set's own UIDs


class _IndexJob:
    """A filed object for the worker to index; ``future`` is settled once it is."""
    __slots__ = ("filing", "head", "complete", "future", "sequence")

    def __init__(self, filing: _Filing, sequence: int):
        self.filing = filing
        incoming = filing.incoming
        self.head = incoming.head
        self.complete = incoming.complete_in_head
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.sequence = sequence


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
    """The file store and the index, with the worker thread that writes the index."""

    def __init__(self, data_dir: str, settings: StorageSettings = StorageSettings()):
        self.data_dir = os.path.abspath(data_dir)
        self.settings = settings
        self.tmp_dir = os.path.join(self.data_dir, "tmp")
        self.archive_dir = os.path.join(self.data_dir, "archive")
        self.pending_marker = os.path.join(self.data_dir, "index.pending")
        os.makedirs(self.tmp_dir, exist_ok=True)
        os.makedirs(self.archive_dir, exist_ok=True)
        self.index = SQLiteIndex(os.path.join(self.data_dir, "index.sqlite"),
                                 durable=settings.fsync)
        self._free_checked_at = 0.0
        self._free_ok = True
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._spares: collections.deque[tuple[str, int]] = collections.deque()
        #: Index jobs are numbered; ``_indexed_through`` is the last one committed.
        self._sequence = itertools.count(1)
        self._enqueued_through = 0
        self._indexed_through = 0
        self._marker_touched_at = time.monotonic()
        self._index_failed = False
        #: Queries run here, on their own read-only connection (WAL lets them
        #: read while the worker writes).
        self.reader = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                            thread_name_prefix="index-read")
        self._read_db: sqlite3.Connection | None = None
        #: Filing that flushes (fsync on) or copies: off the event loop. Several
        #: threads, so that associations storing at once flush at once.
        self._filer = concurrent.futures.ThreadPoolExecutor(max_workers=4,
                                                            thread_name_prefix="archive-file")
        self._file_inline = not (settings.fsync or settings.accept_mismatch)
        # Only the first process on a data dir may clean tmp/ and catch the index up:
        # a daemon's data sets in flight are there while `dicomagent ls` or `import`
        # open the archive.
        self._lock = open(os.path.join(self.data_dir, "archive.lock"), "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._alone = True
        except BlockingIOError:
            self._alone = False
        if self._alone:
            self.recover()
            self.catch_up()
            self._mark_pending()
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
            return IncomingFile.refused("out-of-resources: less free space than "
                                        "storage.min_free_mb", sop_instance_uid,
                                        calling_ae_title)
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

    def receive(self, incoming: IncomingFile) -> "StoreResult | concurrent.futures.Future":
        """File a complete data set: its ``StoreResult`` now, or a future of it.

        Called on the event loop. Filing that only walks headers and renames
        happens here; filing that flushes or copies goes to a filer thread.
        """
        if self._file_inline and incoming.transfer_syntax != DEFLATED:
            return self._receive(incoming)
        return self._filer.submit(self._receive_waiting, incoming)

    def _receive_waiting(self, incoming: IncomingFile) -> StoreResult:
        outcome = self._receive(incoming)
        return outcome.result() if isinstance(outcome, concurrent.futures.Future) else outcome

    def _receive(self, incoming: IncomingFile) -> "StoreResult | concurrent.futures.Future":
        checked = self._check(incoming)
        if type(checked) is StoreResult:
            incoming.discard()
            return checked
        try:
            self._place(checked)
        except OSError as error:
            log.error("C-STORE %s from %s: archive write failed: %s", checked.sop_instance_uid,
                      incoming.calling_ae_title, error)
            incoming.discard()
            return StoreResult(OUT_OF_RESOURCES, f"archive write failed: {error.strerror}")
        job = _IndexJob(checked, next(self._sequence))
        self._enqueued_through = job.sequence
        self._queue.put(job)
        if self._queue.qsize() > MAX_BACKLOG:
            return job.future           # back-pressure: answer once the index has it
        return checked.result

    def _check(self, incoming: IncomingFile) -> "_Filing | StoreResult":
        """Walk the data set, compare it with the command, decide duplicates: its status
        (seed Table 67), and where it goes."""
        if incoming.failure:
            log.warning("C-STORE %s from %s: not stored: %s", incoming.sop_instance_uid,
                        incoming.calling_ae_title, incoming.failure)
            return StoreResult(OUT_OF_RESOURCES, incoming.failure)
        size = incoming.size - incoming.data_offset
        try:
            if size == 0:
                raise StructureError("empty data set")
            if incoming.transfer_syntax == DEFLATED:
                ds = parse_incoming(incoming)
                uids = [str(ds.get(keyword, "")) for keyword in
                        ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                         "SeriesInstanceUID")]
            else:
                found = check_structure(bytes(incoming.head), size, incoming.transfer_syntax,
                                        incoming.path, incoming.data_offset, _FILING_TAGS)
                uids = [_uid_value(found.get(tag, b""))
                        for tag in (SOP_CLASS, SOP_INSTANCE, STUDY, SERIES)]
        except (StructureError, OSError) as error:
            log.warning("C-STORE %s from %s: malformed data set: %s",
                        incoming.sop_instance_uid, incoming.calling_ae_title, error)
            return StoreResult(CANNOT_UNDERSTAND, f"malformed data set: {error}")
        except Exception as error:  # noqa: BLE001 - whatever pydicom says of bad bytes
            log.warning("C-STORE %s from %s: data set cannot be parsed: %s",
                        incoming.sop_instance_uid, incoming.calling_ae_title, error)
            return StoreResult(CANNOT_UNDERSTAND, f"cannot parse the data set: {error}")
        sop_class, sop_instance, study_uid, series_uid = uids
        if not (sop_instance and study_uid and series_uid and sop_class):
            log.warning("C-STORE %s from %s: SOP Class/Instance, Study or Series Instance UID "
                        "missing", incoming.sop_instance_uid, incoming.calling_ae_title)
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
        relative = os.path.join("archive", safe_uid(study_uid), safe_uid(series_uid),
                                safe_uid(sop_instance) + ".dcm")
        final_path = os.path.join(self.data_dir, relative)
        if self.settings.on_duplicate == "keep" and os.path.isfile(final_path):
            log.info("C-STORE %s from %s: already stored, kept the first copy",
                     sop_instance, incoming.calling_ae_title)
            return StoreResult(SUCCESS, "duplicate SOP Instance UID: first copy kept",
                               relative, duplicate=True)
        return _Filing(incoming, sop_class, sop_instance, study_uid, series_uid, relative,
                       final_path, StoreResult(status, comment, relative),
                       rewrite=status == WARNING_COERCED_MISMATCH)

    def _rewrite_header(self, incoming: IncomingFile, sop_class: str, sop_instance: str) -> None:
        """Give a mismatching data set (stored with B007) a header naming its own UIDs."""
        new = IncomingFile(self.tmp_dir, sop_class, sop_instance, incoming.transfer_syntax,
                           incoming.calling_ae_title, incoming.received_at)
        with open(incoming.path, "rb") as source:
            source.seek(incoming.data_offset)
            while chunk := source.read(1 << 20):
                new.write(chunk)
        if new.failure:
            new.discard()
            raise OSError(errno.EIO, new.failure)
        incoming.discard()
        for name in IncomingFile.__slots__:
            setattr(incoming, name, getattr(new, name))

    def _place(self, filing: _Filing) -> None:
        """Flush the temporary file (fsync on), rename it to its final path, flush the
        directories whose entries changed: its own, and the parent of each one made."""
        incoming = filing.incoming
        if filing.rewrite:
            self._rewrite_header(incoming, filing.sop_class_uid, filing.sop_instance_uid)
        if self.settings.fsync:
            os.fdatasync(incoming.fd)       # data and size; the mtime need not wait
        os.close(incoming.fd)
        incoming.fd = -1
        directory = os.path.dirname(filing.final_path)
        changed = [directory]
        try:
            os.replace(incoming.path, filing.final_path)
        except FileNotFoundError:           # the series' first object: make its directories
            missing = directory
            while not os.path.isdir(missing):
                changed.append(os.path.dirname(missing))
                missing = os.path.dirname(missing)
            os.makedirs(directory, exist_ok=True)
            os.replace(incoming.path, filing.final_path)
        incoming.path = ""
        if self.settings.fsync:
            for changed_directory in changed:
                _fsync_directory(changed_directory)

    # --- the worker thread: indexing -----------------------------------------------------

    def call(self, function, *args) -> concurrent.futures.Future:
        """Run ``function(archive, *args)`` on the worker thread, after every object
        filed before it has been indexed.

        For everything else that writes the index (storage commitment, retention):
        the index has one writer.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Call(function, args, future))
        return future

    def caught_up(self) -> concurrent.futures.Future | None:
        """None when every object filed so far is in the index, else a future that is
        done once they are (a query waits for it: it must see what was acknowledged)."""
        if self._indexed_through >= self._enqueued_through:
            return None
        return self.call(lambda archive: None)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if type(job) is _Call:
                job.run(self)
                continue
            batch = [job]
            while len(batch) < 256:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None or type(more) is _Call:
                    self._index_batch(batch)
                    batch = []
                    if more is None:
                        self._queue.put(None)
                        return
                    more.run(self)
                    break
                batch.append(more)
            if batch:
                self._index_batch(batch)
            self._refill_spares()
            if self._queue.empty():
                self._touch_marker()

    def _index_batch(self, batch: list[_IndexJob]) -> None:
        """Index filed objects in one transaction; settle their futures."""
        results = []
        try:
            unlink = []
            for job in batch:
                filing = job.filing
                record = self._record(job)
                existing = self.index.lookup(filing.sop_instance_uid)
                result = filing.result
                if existing is not None and existing["path"] != filing.relative:
                    if self.settings.on_duplicate == "keep":
                        # Filed under another study or series than the first copy.
                        unlink.append(filing.final_path)
                        results.append(StoreResult(result.status, "duplicate SOP Instance "
                                                   "UID: first copy kept", existing["path"],
                                                   duplicate=True))
                        continue
                    unlink.append(os.path.join(self.data_dir, existing["path"]))
                self.index.add(record)
                results.append(StoreResult(result.status, result.comment, result.path,
                                           duplicate=existing is not None))
            self.index.commit()
        except Exception as error:  # noqa: BLE001 - a database failure
            self.index.rollback()
            self._index_failed = True
            log.error("index write failed: %s; %d stored object(s) are not in the index "
                      "until the next start", error, len(batch))
            results = [job.filing.result for job in batch]
            unlink = []
        for path in unlink:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._indexed_through = batch[-1].sequence
        for job, result in zip(batch, results):
            _settle(job.future, result=result)

    def _record(self, job: _IndexJob) -> InstanceRecord:
        """The index record of a filed object: from its head, else from its file."""
        filing = job.filing
        incoming = filing.incoming
        record = None
        try:
            record = record_from_head(bytes(job.head), incoming.transfer_syntax,
                                      complete=job.complete)
            if record is None:
                record = record_from_dataset(parse_file(filing.final_path))
        except Exception as error:  # noqa: BLE001 - the walk passed, pydicom did not
            log.warning("%s: attributes unreadable (%s); indexed by its UIDs only",
                        filing.relative, error)
        if record is None or uids_from_record(record) != (
                filing.sop_class_uid, filing.sop_instance_uid, filing.study_uid,
                filing.series_uid):
            record = InstanceRecord(
                {"PatientID": ""}, {"StudyInstanceUID": filing.study_uid},
                {"SeriesInstanceUID": filing.series_uid},
                {"SOPInstanceUID": filing.sop_instance_uid,
                 "SOPClassUID": filing.sop_class_uid})
        record.path = filing.relative
        record.size = incoming.size
        record.transfer_syntax = incoming.transfer_syntax
        record.received_at = incoming.received_at
        record.calling_ae_title = incoming.calling_ae_title
        record.crc32 = incoming.crc32 if job.complete else _crc32(
            filing.final_path, incoming.data_offset + len(job.head), incoming.crc32)
        return record

    def _mark_pending(self) -> None:
        """Create (or refresh) ``index.pending``: this daemon may file objects that are
        not yet indexed. Flushed with its directory, or a power cut could lose it."""
        with open(self.pending_marker, "a"):
            pass
        os.utime(self.pending_marker)
        if self.settings.fsync:
            _fsync_directory(self.data_dir)

    def _touch_marker(self) -> None:
        """The index is caught up: move ``index.pending``'s time forward (at most once
        every ``PENDING_MARGIN`` seconds), so that a later start has less to re-read."""
        if not self._alone or self._index_failed:
            return
        now = time.monotonic()
        if now - self._marker_touched_at >= PENDING_MARGIN:
            self._marker_touched_at = now
            try:
                os.utime(self.pending_marker)
            except OSError as error:
                log.warning("cannot refresh %s: %s", self.pending_marker, error.strerror)

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
        """Drop what a crash left in ``tmp/``: data sets never acknowledged, or put back a
        file that ``delete`` parked there when its index row survived the crash."""
        for name in os.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, name)
            row = None
            if name.endswith(".deleting"):
                try:
                    row = self.index.lookup(str(pydicom.dcmread(
                        path, stop_before_pixels=True,
                        specific_tags=[0x00080018]).get("SOPInstanceUID", "")))
                except Exception:  # noqa: BLE001 - unreadable: nothing to put back
                    row = None
            if row is not None:
                final = os.path.join(self.data_dir, row["path"])
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.replace(path, final)
                log.info("put back %s (its deletion was interrupted)", row["path"])
                continue
            os.unlink(path)
            if not name.endswith(".spare"):
                log.info("removed %s (incomplete when the agent stopped)", name)

    def catch_up(self) -> int:
        """After a crash: index the filed objects the index does not have yet.

        ``index.pending`` left behind says the last daemon did not stop
        cleanly; every series directory changed since its time (less
        ``PENDING_MARGIN``) is read, and each file whose SOP Instance UID the
        index does not list at that path is indexed. Returns how many.
        """
        try:
            since = os.stat(self.pending_marker).st_mtime - PENDING_MARGIN
        except FileNotFoundError:
            return 0
        added = 0
        for study in _subdirectories(self.archive_dir):
            for series in _subdirectories(study.path):
                if series.stat().st_mtime < since:
                    continue
                for entry in os.scandir(series.path):
                    if entry.name.endswith(".dcm") and entry.is_file():
                        added += self._catch_up_file(entry.path)
        self.index.commit()
        if added:
            log.warning("indexed %d object(s) filed before the last stop but not indexed then",
                        added)
        return added

    def _catch_up_file(self, path: str) -> int:
        relative = os.path.relpath(path, self.data_dir)
        name = os.path.basename(path)[:-len(".dcm")]
        if not name.startswith("x"):                # a UID, not a hash: look it up directly
            row = self.index.lookup(name)
            if row is not None and row["path"] == relative:
                return 0
        try:
            with open(path, "rb") as handle:
                meta, _ = read_file_meta(handle)
            record = record_from_dataset(parse_file(path))
        except Exception as error:  # noqa: BLE001 - not ours to judge now: leave it
            log.warning("%s: cannot be read to index it: %s", relative, error)
            return 0
        existing = self.index.lookup(record.sop_instance_uid)
        if existing is not None and existing["path"] == relative:
            return 0
        if existing is not None and self.settings.on_duplicate == "keep":
            os.unlink(path)
            return 0
        stat = os.stat(path)
        record.path = relative
        record.size = stat.st_size
        record.transfer_syntax = meta["transfer_syntax"]
        record.received_at = stat.st_mtime
        record.calling_ae_title = meta.get("source_ae_title", "")
        record.crc32 = _crc32(path)
        self.index.add(record)
        if existing is not None:
            try:
                os.unlink(os.path.join(self.data_dir, existing["path"]))
            except FileNotFoundError:
                pass
        return 1

    # --- queries (on the reader thread) ----------------------------------------------------

    def execute(self, sql: str, params: list) -> sqlite3.Cursor:
        """Run a query on the read connection (call on ``self.reader``)."""
        if self._read_db is None:
            self._read_db = sqlite3.connect(self.index.path, check_same_thread=False)
            self._read_db.execute("PRAGMA query_only=ON")
        return self._read_db.execute(sql, params)

    def close(self) -> None:
        """Stop: file what is being filed, index everything, and say so (``index.pending``
        removed: the next start need not catch up)."""
        self._filer.shutdown(wait=True)
        self._queue.put(None)
        self._worker.join()
        while self._spares:
            path, fd = self._spares.popleft()
            os.close(fd)
            os.unlink(path)
        self.reader.shutdown(wait=True)
        if self._read_db is not None:
            self._read_db.close()
        self.index.close()
        if self._alone and not self._index_failed:
            os.unlink(self.pending_marker)
        self._lock.close()

    # --- import from disk --------------------------------------------------------------------

    def import_file(self, path: str, calling_ae_title: str = "") -> StoreResult:
        """Add a Part 10 file from disk through the same checks as a C-STORE; returns once
        it is in the index."""
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
        outcome = self._receive(incoming)
        if isinstance(outcome, concurrent.futures.Future):
            return outcome.result()
        pending = self.caught_up()
        if pending is not None:
            pending.result()
        return outcome


def _subdirectories(path: str) -> list[os.DirEntry]:
    return [entry for entry in os.scandir(path) if entry.is_dir(follow_symlinks=False)]


def _settle(future: concurrent.futures.Future, result=None, exception=None) -> None:
    """Give a caller its result, unless it stopped waiting (a cancelled future must not
    take the worker thread down)."""
    if not future.set_running_or_notify_cancel():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc32(path: str, offset: int = 0, crc: int = 0) -> int:
    """CRC-32 of a file from ``offset`` on, continuing ``crc``."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc
