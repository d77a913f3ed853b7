"""The archive: stored objects on disk and their index.

Layout under the data dir::

    archive/<Study UID>/<Series UID>/<SOP Instance UID>.dcm   the objects (Part 10 files)
    tmp/                                                     where data sets being received
                                                             live: *.spare files made ahead
                                                             (fsync on; empty ones are kept
                                                             for the next start), unnamed
                                                             (O_TMPFILE) or *.part files
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
   Table 67), and the file is put in place. With ``storage.fsync`` on, the
   data is flushed before the file is given its name, and the response
   waits until both are on stable storage: an acknowledged object is never
   lost. That takes one device flush per object (``_place``): the data set
   was written into a file whose name in ``tmp/`` is already on stable
   storage, it is sealed with its size and CRC-32 and flushed, then linked
   into the archive; the archive directories are flushed for many objects
   at once a moment later (``_settle_filed``), and until then the name in
   ``tmp/`` is what a restart would find it by (``recover``). With fsync
   off, filing is a header walk and a link, done on the event loop; with
   fsync on it runs on a filer thread (or on the event loop when only one
   association is open: ``receive``).
2. **Indexing**, just after, in the indexer (``indexer.py``: a process of its
   own in the daemon, the worker thread in command-line tools): the header
   attributes are read from the file and written to the index, many objects
   per transaction. A query, a storage commitment or a deletion waits for
   the objects acknowledged before it (``caught_up``, ``call``). When
   indexing falls more than ``MAX_BACKLOG`` objects behind, responses wait
   for it (back-pressure).

The files are the truth, the index is derived from them. A crash leaves at
worst a data set in ``tmp/`` that was never acknowledged (an unnamed file
vanishes by itself; a named one is removed at the next start), a sealed one
that was (filed at the next start), and filed objects whose index rows were
not written yet: ``index.pending`` exists
while a daemon runs, and its modification time moves forward while the
index is caught up; a start that finds it re-reads every series directory
changed since then (``catch_up``) and indexes what is missing.

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
from dataclasses import dataclass

import pydicom

from dicomagent.archive.indexer import (PENDING_MARGIN, IndexJob, IndexResult, ProcessIndexer,
                                        ThreadIndexer, index_jobs, parse_file)
from dicomagent.archive.incoming import (IncomingFile, can_seal, create_temporary,
                                         file_crc32, fsync_directory, is_sealed_intact, seal)
from dicomagent.archive.index import SQLiteIndex
from dicomagent.archive.keys import INDEXED_TAGS
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

#: Temporary files kept created ahead of the receiving side (``open_incoming``): enough
#: for many associations storing at once, each taking one per object.
SPARES = 256


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


#: Transfer syntax whose data set is deflated (PS3.5 A.5): pydicom reads it.
DEFLATED = "1.2.840.10008.1.2.1.99"

#: The top-level elements filing needs: they name the object and its path.
SOP_CLASS, SOP_INSTANCE, STUDY, SERIES = 0x00080016, 0x00080018, 0x0020000D, 0x0020000E
_FILING_TAGS = frozenset((SOP_CLASS, SOP_INSTANCE, STUDY, SERIES))

#: Objects filed but not yet indexed beyond which responses wait for the index.
MAX_BACKLOG = 512

#: Seconds the worker waits after a first object for more to index with it (less when
#: somebody waits for the index: ``call``).
BATCH_WAIT = 0.02



def _uid_value(raw) -> str:
    return bytes(raw).rstrip(b"\x00 ").decode("ascii", "replace")


def _uids_of(ds: pydicom.Dataset) -> list[str]:
    """SOP Class, SOP Instance, Study and Series Instance UIDs of a parsed data set."""
    return [str(ds.get(keyword, "")) for keyword in
            ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")]


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

    def __init__(self, data_dir: str, settings: StorageSettings = StorageSettings(),
                 index_in_process: bool = False, spares: int = 0):
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
        self._hurry = threading.Event()
        #: Temporary files created ahead (``SPARES`` for the daemon, none for a tool).
        self._spares: collections.deque[tuple[str, int, bool]] = collections.deque()
        self._spares_wanted = spares
        #: One flush per object (``_place``): with fsync on, where files take a seal.
        self._one_flush = settings.fsync and can_seal(self.tmp_dir)
        #: Objects answered whose archive entries are not yet flushed: (name in tmp/,
        #: directories to flush), settled by the worker (``_settle_filed``).
        self._unsettled: collections.deque[tuple[str, tuple[str, ...]]] = collections.deque()
        #: Index jobs are numbered; ``_indexed_through`` is the last one committed.
        self._sequence = itertools.count(1)
        self._enqueued_through = 0
        self._indexed_through = 0
        self._index_failed = False
        #: Futures of responses that wait for the index (back-pressure), by job number,
        #: with the result the object was filed with.
        self._waiting: dict[int, tuple[concurrent.futures.Future, StoreResult]] = {}
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
        if index_in_process:
            self._indexer = ProcessIndexer(
                self.index.path, self.data_dir, settings.on_duplicate, self.pending_marker,
                self._indexed, received_spares=self._received_spares if spares else None,
                named_spares=self._one_flush)
        else:
            self._indexer = ThreadIndexer(self.index, self.data_dir, settings.on_duplicate,
                                          self._indexed)
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

        Creating a file costs a good part of a small object's time, so some
        are kept created ahead (``SPARES``: the worker makes them at start, then
        the indexer process or ``make_spare``) and the receiving side takes one of
        those when it can.
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
                            calling_ae_title, time.time(), spare,
                            write_ahead=self.settings.fsync,
                            checksum=self._one_flush and spare is not None)

    def make_spare(self) -> None:
        """On the event loop, once a data set is answered: replace the spare it took,
        unless somebody else makes them.

        The daemon's indexer process makes them (``_ask_for_spares``): a file
        costs the kernel 20 to 100 µs to create, and whatever the event loop
        spends there, a serial sender (storescu, most modalities) waits for, as
        both often take turns on one CPU. (The worker thread made them once:
        it and the event loop then took turns at the interpreter lock around
        each file, and the gain was lost.) Where there is no such process (or no
        more), this makes them, between a response and the sender's next request.
        Named spares (one-flush filing) never come from here: they are handed out
        only after a flush of ``tmp/``, one for many of them (the process's, or
        the worker's, ``_refill_spares``).
        """
        if self._one_flush or self._indexer.makes_spares:
            return
        # Two when more are missing: spares taken by data sets never received (an
        # aborted association) are made up for too.
        for _ in range(min(2, self._spares_wanted - len(self._spares))):
            try:
                self._spares.append(create_temporary(self.tmp_dir, ".spare"))
            except OSError:
                return          # the next object creates its own, and says why if it can't

    def _received_spares(self, fds: list[int], names: list[str]) -> None:
        """Temporary files from the indexer process (on its spares thread)."""
        self._spares.extend((os.path.join(self.tmp_dir, name), fd, True) if name
                            else (f"/proc/self/fd/{fd}", fd, False)
                            for fd, name in zip(fds, names))

    def _ask_for_spares(self) -> None:
        """On the worker, after each index batch: ask the indexer process for the
        spares taken since (one request at a time)."""
        missing = self._spares_wanted - len(self._spares)
        if missing > 0:
            self._indexer.make_spares(missing)

    def _refill_spares(self) -> None:
        """On the worker: create temporary files ahead for ``open_incoming`` (at start;
        later they come from the indexer process, ``_ask_for_spares``, and where there is
        none, from here for named ones and from the event loop for unnamed ones,
        ``make_spare``).

        For one-flush filing they are named files in ``tmp/``, handed out only
        once ``tmp/`` is flushed: a data set written into one has a name on
        stable storage before it is even received; those left unused at a
        stop stay for the next start (``recover``): freeing hundreds of inodes
        at each stop would make creating files slower for minutes after it
        (ext4 without a journal skips recently freed inodes). Otherwise they
        are unnamed (``O_TMPFILE``: cheaper to make than a name in a busy
        directory: about 25 against 60 µs of kernel time each on this project's
        test machine).
        """
        made = []
        try:
            while len(self._spares) + len(made) < self._spares_wanted:
                made.append(create_temporary(self.tmp_dir, ".spare", named=self._one_flush))
            if self._one_flush and made:
                fsync_directory(self.tmp_dir)
        except OSError as error:
            log.warning("cannot create temporary files ahead: %s", error.strerror)
            for path, fd, named in made:
                os.close(fd)
                if named:
                    os.unlink(path)
            return
        self._spares.extend(made)

    def receive(self, incoming: IncomingFile, alone: bool = False
                ) -> "StoreResult | concurrent.futures.Future":
        """File a complete data set: its ``StoreResult`` now, or a future of it.

        Called on the event loop. The check (a walk over element headers) is
        done here, and so is the rest when it is only a link; filing that
        flushes or copies goes to a filer thread. A deflated data set is
        inflated by pydicom to be checked: all of it on the filer thread.

        ``alone``: the caller's association is the only one open. Then the
        flushes are done here too: the one sender waits for them anyway, and
        nobody else waits on the event loop, while a thread would add two
        thread wake-ups (a few hundred microseconds on a virtual machine) to
        every object. A second association sends them back to the threads.
        """
        if incoming.transfer_syntax == DEFLATED:
            return self._filer.submit(self._receive_waiting, incoming)
        checked = self._check(incoming)
        if type(checked) is StoreResult:
            incoming.discard()
            return checked
        if self._file_inline or (alone and not checked.rewrite):
            return self._file(checked)
        return self._filer.submit(self._file_waiting, checked)

    def _receive_waiting(self, incoming: IncomingFile) -> StoreResult:
        checked = self._check(incoming)
        if type(checked) is StoreResult:
            incoming.discard()
            return checked
        return self._file_waiting(checked)

    def _file_waiting(self, checked: _Filing) -> StoreResult:
        outcome = self._file(checked)
        return outcome.result() if isinstance(outcome, concurrent.futures.Future) else outcome

    def _file(self, checked: _Filing) -> "StoreResult | concurrent.futures.Future":
        """Put a checked data set in place and hand it to the indexer."""
        try:
            self._place(checked)
        except OSError as error:
            if isinstance(error, FileExistsError) and os.path.isfile(checked.final_path):
                log.info("C-STORE %s from %s: already stored, kept the first copy",
                         checked.sop_instance_uid, checked.incoming.calling_ae_title)
                checked.incoming.discard()
                return StoreResult(SUCCESS, "duplicate SOP Instance UID: first copy kept",
                                   checked.relative, duplicate=True)
            log.error("C-STORE %s from %s: archive write failed: %s", checked.sop_instance_uid,
                      checked.incoming.calling_ae_title, error)
            checked.incoming.discard()
            return StoreResult(OUT_OF_RESOURCES, f"archive write failed: {error.strerror}")
        incoming = checked.incoming
        sequence = next(self._sequence)
        future = None
        if sequence - self._indexed_through > MAX_BACKLOG:
            # Back-pressure: the index is far behind; answer once it has this one.
            future = concurrent.futures.Future()
            self._waiting[sequence] = (future, checked.result)
        job = IndexJob(sequence, checked.relative, checked.sop_class_uid,
                       checked.sop_instance_uid, checked.study_uid, checked.series_uid,
                       incoming.data_offset, incoming.transfer_syntax, incoming.received_at,
                       incoming.calling_ae_title, checked.result.status, checked.result.comment,
                       answer=future is not None, size=incoming.size,
                       crc32=-1 if incoming.crc is None else incoming.crc)
        self._enqueued_through = job.sequence
        self._queue.put(job)
        return future if future is not None else checked.result

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
                uids = _uids_of(parse_incoming(incoming))
            else:
                found = check_structure(incoming.head, size, incoming.transfer_syntax,
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
        relative = _relative_path(study_uid, series_uid, sop_instance)
        final_path = os.path.join(self.data_dir, relative)
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
        new.finish()
        if new.failure:
            new.discard()
            raise OSError(errno.EIO, new.failure)
        incoming.discard()
        for name in IncomingFile.__slots__:
            setattr(incoming, name, getattr(new, name))

    def _place(self, filing: _Filing) -> None:
        """Flush the temporary file (fsync on) and give it its final name; with fsync
        on, its name is on stable storage before this returns (the response).

        Either way the data reaches stable storage before the name that points to it:

        - **one flush** (a sealed spare, ``_one_flush``): the file already has a
          name on stable storage, in ``tmp/`` (``_refill_spares``). It is sealed
          (size and CRC-32 in an extended attribute) and flushed, data, size and
          seal together: one device flush. Then it is linked into the archive,
          and its name in ``tmp/`` kept until the worker has flushed the archive
          directory (``_settle_filed``, once for many objects). A crash before that
          leaves it sealed in ``tmp/``, where the next start files it (``recover``).
        - **two flushes** (anything else): flush the file, give it its final name,
          flush the directories whose entries changed: its own, and the parent of
          each one made.

        A file already at the final path raises ``FileExistsError`` when the
        first copy is kept (``on_duplicate = "keep"``): the link says so, with
        no look per object beforehand, except before a flush (a look costs far
        less than flushing a duplicate).
        """
        incoming = filing.incoming
        replace = self.settings.on_duplicate == "replace"
        if filing.rewrite:
            self._rewrite_header(incoming, filing.sop_class_uid, filing.sop_instance_uid)
        if incoming.crc is not None and incoming.named:
            if not replace and os.path.isfile(filing.final_path):
                raise FileExistsError(errno.EEXIST, "already stored", filing.final_path)
            seal(incoming.fd, incoming.size, incoming.crc)
            os.fsync(incoming.fd)           # data, size and seal
            try:
                made = _in_place(filing.final_path, lambda: os.link(incoming.path,
                                                                    filing.final_path))
            except FileExistsError:         # a duplicate to replace: the two-flush way
                if not replace:
                    raise
                incoming.crc = None
            else:
                os.close(incoming.fd)
                incoming.fd = -1
                self._unsettled.append((incoming.path,
                                        (os.path.dirname(filing.final_path), *made)))
                incoming.path = ""
                return
        if self.settings.fsync:
            os.fdatasync(incoming.fd)       # data and size; the mtime need not wait
        made = _in_place(filing.final_path,
                         lambda: incoming.put_in_place(filing.final_path, replace))
        os.close(incoming.fd)
        incoming.fd = -1
        incoming.path = ""
        if self.settings.fsync:
            _fsync_directories(filing.final_path, made)

    def _settle_filed(self, flush_tmp: bool = False) -> None:
        """On the worker: flush the archive directories of the objects filed in one
        flush since the last time (each directory once), then drop their names in
        ``tmp/``: flushed with the next spares (``_refill_spares``), or at once
        (``flush_tmp``: before a deletion, which a name left in ``tmp/`` could undo)."""
        if not self._unsettled:
            return
        names, directories = [], set()
        while self._unsettled:
            name, changed = self._unsettled.popleft()
            names.append(name)
            directories.update(changed)
        try:
            for directory in directories:
                fsync_directory(directory)
        except OSError as error:
            # The names in tmp/ stay: the next start files what is missing (``recover``).
            log.error("cannot flush archive directories: %s", error)
            return
        for name in names:
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass
        if flush_tmp:
            try:
                fsync_directory(self.tmp_dir)
            except OSError as error:
                log.error("cannot flush %s: %s", self.tmp_dir, error)

    # --- the worker thread: indexing -----------------------------------------------------

    def call(self, function, *args) -> concurrent.futures.Future:
        """Run ``function(archive, *args)`` on the worker thread, after every object
        filed before it has been indexed.

        For everything else that writes the index (storage commitment, retention):
        the index has one writer.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Call(function, args, future))
        self._hurry.set()
        return future

    def caught_up(self) -> concurrent.futures.Future | None:
        """None when every object filed so far is in the index, else a future that is
        done once they are (a query waits for it: it must see what was acknowledged)."""
        if self._indexed_through >= self._enqueued_through:
            return None
        return self.call(lambda archive: None)

    def _work(self) -> None:
        self._refill_spares()
        while True:
            job = self._queue.get()
            if job is None:
                self._settle_filed(flush_tmp=True)
                self._indexer.wait()
                return
            if type(job) is _Call:
                self._settle_filed(flush_tmp=True)
                self._indexer.wait()
                job.run(self)
                continue
            # Objects arrive one every few hundred microseconds from a busy sender:
            # gathering them for a moment makes one batch (one thread switch, one
            # message, one transaction) of what would be many. A call (a query, a
            # release waiting for the index) cuts the wait short; objects do not.
            self._hurry.wait(BATCH_WAIT)
            self._hurry.clear()
            batch = [job]
            while len(batch) < 256:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None or type(more) is _Call:
                    self._settle_filed(flush_tmp=True)
                    self._indexer.index_jobs(batch)
                    batch = []
                    self._indexer.wait()
                    if more is None:
                        return
                    more.run(self)
                    break
                batch.append(more)
            if batch:
                self._settle_filed()
                self._indexer.index_jobs(batch)
            if self._one_flush and not self._indexer.makes_spares:
                self._refill_spares()
            self._ask_for_spares()

    def _indexed(self, results: "list[IndexResult] | None", through: int) -> None:
        """The indexer's answer for the jobs up to ``through`` (``results`` None: failed).
        Settles the responses waiting for them (back-pressure, ``import_file``)."""
        if results is None:
            self._index_failed = True
            for sequence in [s for s in self._waiting if s <= through]:
                future, filed = self._waiting.pop(sequence)
                _settle(future, result=filed)
        elif self._waiting:
            for result in results:
                waiting = self._waiting.pop(result.sequence, None)
                if waiting is not None:
                    _settle(waiting[0], result=StoreResult(result.status, result.comment,
                                                           result.path, result.duplicate))
        self._indexed_through = through

    def _mark_pending(self) -> None:
        """Create (or refresh) ``index.pending``: this daemon may file objects that are
        not yet indexed. Flushed with its directory, or a power cut could lose it."""
        with open(self.pending_marker, "a"):
            pass
        os.utime(self.pending_marker)
        if self.settings.fsync:
            fsync_directory(self.data_dir)

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
            if os.path.getsize(path) != row["size"] or file_crc32(path) != row["crc32"]:
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
        file that ``delete`` parked there when its index row survived the crash. Empty
        spare files are taken as this start's spares (as many as wanted)."""
        kept: list[tuple[str, int, bool]] = []
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
            spare = name.endswith(".spare")
            size = os.path.getsize(path)
            if spare and not size and len(kept) < self._spares_wanted:
                kept.append((path, os.open(path, os.O_WRONLY), True))
                continue
            if spare and size and is_sealed_intact(path):
                self._refile(path)
            elif not spare or size:
                log.info("removed %s (incomplete when the agent stopped)", name)
            os.unlink(path)
        if kept and self._one_flush:
            fsync_directory(self.tmp_dir)      # their names, before they are handed out
        self._spares.extend(kept)

    def _refile(self, path: str) -> None:
        """A sealed file found in ``tmp/``: complete and flushed before a crash, maybe
        acknowledged while its name in the archive was not yet on stable storage
        (one-flush filing, ``_place``). It is linked in place unless a file is there;
        ``catch_up`` then indexes it."""
        try:
            _, sop_instance, study, series = _uids_of(parse_file(path))
        except Exception as error:  # noqa: BLE001 - sealed, so ours; unreadable: say so
            log.error("%s: sealed but unreadable, not filed: %s", path, error)
            return
        final = os.path.join(self.data_dir, _relative_path(study, series, sop_instance))
        if os.path.exists(final):
            return
        made = _in_place(final, lambda: os.link(path, final))
        if self.settings.fsync:
            _fsync_directories(final, made)
        log.warning("filed %s again: flushed before the last stop, its name in the archive "
                    "was not", os.path.relpath(final, self.data_dir))

    def catch_up(self) -> int:
        """After a crash: index the filed objects the index does not have yet.

        ``index.pending`` left behind says the last daemon did not stop
        cleanly; every series directory changed since its time (less
        ``PENDING_MARGIN``) is read, and each file the index does not list
        at that path is indexed (the duplicate rule applies as for a
        C-STORE). Returns how many were indexed.
        """
        try:
            since = os.stat(self.pending_marker).st_mtime - PENDING_MARGIN
        except FileNotFoundError:
            return 0
        jobs = []
        added = 0
        for study in _subdirectories(self.archive_dir):
            for series in _subdirectories(study.path):
                if series.stat().st_mtime < since:
                    continue
                for entry in os.scandir(series.path):
                    if entry.name.endswith(".dcm") and entry.is_file():
                        job = self._catch_up_job(entry.path, len(jobs) + 1)
                        if job is not None:
                            jobs.append(job)
                    if len(jobs) >= 256:
                        added += self._index_caught_up(jobs)
                        jobs = []
        if jobs:
            added += self._index_caught_up(jobs)
        if added:
            log.warning("indexed %d object(s) filed before the last stop but not indexed then",
                        added)
        return added

    def _index_caught_up(self, jobs: list[IndexJob]) -> int:
        results = index_jobs(self.index, self.data_dir, self.settings.on_duplicate, jobs)
        return sum(1 for job, result in zip(jobs, results) if result.path == job.relative)

    def _catch_up_job(self, path: str, sequence: int) -> IndexJob | None:
        """An ``IndexJob`` for a file under archive/ the index does not list there."""
        relative = os.path.relpath(path, self.data_dir)
        name = os.path.basename(path)[:-len(".dcm")]
        if not name.startswith("x"):                # a UID, not a hash: look it up directly
            row = self.index.lookup(name)
            if row is not None and row["path"] == relative:
                return None
        try:
            with open(path, "rb") as handle:
                meta, data_offset = read_file_meta(handle)
            uids = _uids_of(parse_file(path))
        except Exception as error:  # noqa: BLE001 - not ours to judge now: leave it
            log.warning("%s: cannot be read to index it: %s", relative, error)
            return None
        row = self.index.lookup(uids[1])
        if row is not None and row["path"] == relative:
            return None
        return IndexJob(sequence, relative, *uids, data_offset, meta["transfer_syntax"],
                        os.stat(path).st_mtime, meta.get("source_ae_title", ""), SUCCESS, "")

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
        self._hurry.set()
        self._worker.join()
        self._indexer.close()
        if getattr(self._indexer, "failed", False):
            self._index_failed = True
        while self._spares:             # named ones stay, for the next start
            path, fd, named = self._spares.popleft()
            os.close(fd)
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
                incoming.finish()
        except (NotPart10Error, OSError) as error:
            return StoreResult(CANNOT_UNDERSTAND, f"not a DICOM Part 10 file: {error}")
        outcome = self._receive_waiting(incoming)
        pending = self.caught_up()
        if pending is not None:
            pending.result()
        return outcome


def _relative_path(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
    """Where an object is filed, under the data dir (never a path from the peer)."""
    return os.path.join("archive", safe_uid(study_uid), safe_uid(series_uid),
                        safe_uid(sop_instance_uid) + ".dcm")


def _in_place(final_path: str, put) -> list[str]:
    """``put()`` a file at ``final_path``, making its directories when missing (the
    series' first object); returns the parents of the directories made."""
    try:
        put()
        return []
    except FileNotFoundError:
        pass
    directory = os.path.dirname(final_path)
    made = []
    missing = directory
    while not os.path.isdir(missing):
        made.append(os.path.dirname(missing))
        missing = os.path.dirname(missing)
    os.makedirs(directory, exist_ok=True)
    put()
    return made


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


def _fsync_directories(final_path: str, made: list[str]) -> None:
    """Flush the directories whose entries changed when ``final_path`` was put in place:
    its own, and the parent of each one made for it (``_in_place``)."""
    for directory in [os.path.dirname(final_path), *made]:
        fsync_directory(directory)
