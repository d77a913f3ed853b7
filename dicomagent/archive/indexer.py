"""The archive's second stage: reading filed objects into the index.

An ``IndexJob`` describes one object the archive has filed (and
acknowledged). ``index_jobs`` reads each one's header attributes from its
file, applies the duplicate rule, writes the rows and commits once for the
whole batch. It runs in one of two places, behind the same two methods
(``index_jobs(jobs)``, ``wait()``):

- ``ThreadIndexer``: on the archive's worker thread (command-line tools);
- ``ProcessIndexer``: in a process of its own (the daemon). Parsing headers
  is pure Python; in the daemon's process it would hold the interpreter
  lock against the event loop that receives the next object, which is
  what limits a Python node's storage rate. Here it runs beside it, on the
  other core. Jobs go down a pipe; now and then (at once when asked) the
  process answers with the last job number it committed and the results
  somebody waits for. It also makes the empty temporary files that the
  event loop writes received data sets into (``make_spares``), and hands
  them over open, through a socket (``SCM_RIGHTS``): creating a file costs
  the kernel tens of microseconds (far more on a file system where many
  files were just deleted), which here stay off the event loop, and off
  the interpreter lock the event loop needs.

References
----------
Seed Tables 41-48 (what is indexed); PS3.10 §7 (the files read here).
"""

from __future__ import annotations

import array
import gc
import logging
import multiprocessing
import operator
import os
import signal
import socket
import threading
import time
import zlib
from dataclasses import dataclass

import pydicom

from dicomagent.archive.header import record_from_head, uids_from_record
from dicomagent.archive.incoming import create_temporary, fsync_directory
from dicomagent.archive.index import InstanceRecord, SQLiteIndex
from dicomagent.archive.keys import (INDEXED_TAGS, INSTANCE_KEYS, PATIENT_KEYS, SERIES_KEYS,
                                     STUDY_KEYS)
from dicomagent.archive.query import text_value

log = logging.getLogger("dicomagent.archive")

#: Bytes of a data set read for its header attributes; pydicom reads the file
#: when they are not all in there.
HEAD_BYTES = 64 * 1024


@dataclass(slots=True)
class IndexJob:
    """One filed object to index (plain values: it crosses a pipe)."""
    sequence: int
    relative: str               # its path under the data dir
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    data_offset: int            # where the data set starts in the file
    transfer_syntax: str
    received_at: float
    calling_ae_title: str
    status: int                 # the status it was acknowledged with
    comment: str
    answer: bool = False        # somebody waits for its result: answer at once
    size: int = -1              # the file's size and CRC-32 when filing knows them (it
    crc32: int = -1             # kept them for the seal); else read from the file

    def __reduce__(self):
        # Pickled as the class and its values: a slotted dataclass's own way (its
        # __getstate__) costs several times more, on a thread of the event loop's process.
        return IndexJob, _job_values(self)


_job_values = operator.attrgetter(*IndexJob.__slots__)


@dataclass(slots=True)
class IndexResult:
    """What became of a job: the final status, the path the index names."""
    sequence: int
    status: int
    comment: str
    path: str
    duplicate: bool


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
            charset = text_value(element)
            continue
        found = _KEY_LEVELS.get(tag)
        if found is None:
            continue
        level, is_sequence = found
        attrs[level][f"{tag:08X}"] = element.to_json_dict(None, 1 << 20)
        if not is_sequence:
            values[level][element.keyword] = text_value(element)
    return InstanceRecord.of_levels(values, attrs, charset, charset_json)


def parse_file(path: str) -> pydicom.Dataset:
    """The header attributes of a Part 10 file, read by pydicom (pixel data not read)."""
    return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(INDEXED_TAGS))


def file_facts(path: str, data_offset: int, size: int = -1, crc: int = -1
               ) -> tuple[bytes, int, int]:
    """(the data set's first ``HEAD_BYTES``, file size, CRC-32 of the whole file).

    Given the size and CRC-32 (filing kept them for the seal), only the head is read.
    This runs for every stored object, so it reads with ``os.pread``: a small file takes
    three system calls (open, read, close), where a buffered ``open`` adds a ``fstat``,
    an ``ioctl``, a ``lseek`` and a read that finds the end.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        if crc >= 0:
            return os.pread(fd, HEAD_BYTES, data_offset), size, crc
        wanted = data_offset + HEAD_BYTES
        first = os.pread(fd, wanted, 0)       # preamble, File Meta and the head at once
        crc = zlib.crc32(first)
        size = len(first)
        if size == wanted:                    # else that read met the end of the file
            while chunk := os.pread(fd, 1 << 20, size):
                crc = zlib.crc32(chunk, crc)
                size += len(chunk)
    finally:
        os.close(fd)
    return first[data_offset:], size, crc


def job_record(job: IndexJob, path: str) -> InstanceRecord:
    """The index record of a filed object, read from its file.

    The header reader of ``header.py`` when it can, else pydicom. When
    neither can read the attributes of a data set whose structure the
    filing walk accepted, the object is indexed by its UIDs alone (and a
    warning says so): it was acknowledged, so it must be findable.
    """
    head, size, crc = file_facts(path, job.data_offset, job.size, job.crc32)
    record = None
    try:
        record = record_from_head(head, job.transfer_syntax,
                                  complete=size - job.data_offset == len(head))
        if record is None:
            record = record_from_dataset(parse_file(path))
    except Exception as error:  # noqa: BLE001 - the walk passed, the parser did not
        log.warning("%s: attributes unreadable (%s); indexed by its UIDs only",
                    job.relative, error)
    if record is None or uids_from_record(record) != (
            job.sop_class_uid, job.sop_instance_uid, job.study_uid, job.series_uid):
        record = InstanceRecord(
            {"PatientID": ""}, {"StudyInstanceUID": job.study_uid},
            {"SeriesInstanceUID": job.series_uid},
            {"SOPInstanceUID": job.sop_instance_uid, "SOPClassUID": job.sop_class_uid})
    record.path = job.relative
    record.size = size
    record.transfer_syntax = job.transfer_syntax
    record.received_at = job.received_at
    record.calling_ae_title = job.calling_ae_title
    record.crc32 = crc
    return record


def index_jobs(index: SQLiteIndex, data_dir: str, on_duplicate: str,
               jobs: list[IndexJob]) -> list[IndexResult]:
    """Index filed objects in one transaction (raises when the database fails).

    Duplicates under the same path were settled by filing (kept, or
    replaced by the rename). One filed under another study or series than
    the indexed copy: ``keep`` removes the new file, ``replace`` the old.
    """
    results = []
    unlink = []
    try:
        for job in jobs:
            existing = index.lookup(job.sop_instance_uid)
            if existing is not None and existing["path"] != job.relative:
                if on_duplicate == "keep":
                    unlink.append(job.relative)
                    results.append(IndexResult(job.sequence, job.status, "duplicate SOP "
                                               "Instance UID: first copy kept",
                                               existing["path"], True))
                    continue
                unlink.append(existing["path"])
            index.add(job_record(job, os.path.join(data_dir, job.relative)),
                      replacing=existing is not None)
            results.append(IndexResult(job.sequence, job.status, job.comment, job.relative,
                                       existing is not None))
        index.commit()
    except BaseException:
        index.rollback()
        raise
    for relative in unlink:
        try:
            os.unlink(os.path.join(data_dir, relative))
        except FileNotFoundError:
            pass
    return results


class ThreadIndexer:
    """Indexes on the calling thread (the archive's worker)."""

    def __init__(self, index: SQLiteIndex, data_dir: str, on_duplicate: str, done):
        self.index = index
        self.data_dir = data_dir
        self.on_duplicate = on_duplicate
        self._done = done           # done(results or None, last sequence)

    def index_jobs(self, jobs: list[IndexJob]) -> None:
        try:
            results = index_jobs(self.index, self.data_dir, self.on_duplicate, jobs)
        except Exception as error:  # noqa: BLE001 - a database failure
            log.error("index write failed: %s; %d stored object(s) are not in the index "
                      "until the next start", error, len(jobs))
            results = None
        self._done(results, jobs[-1].sequence)

    def wait(self) -> None:
        """Every job handed over is indexed (here: at once)."""

    #: Temporary files are made by the event loop (``Archive.make_spare``).
    makes_spares = False

    def make_spares(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


class ProcessIndexer:
    """Indexes in a child process; a thread here reads its answers.

    ``done(results, last_sequence)`` is called on that thread for each
    batch (``results`` None when the batch failed); ``wait()`` returns once
    every job handed over has been answered, or the process has gone.

    ``received_spares(fds, names)``, when given, is called on another thread
    of ours with the files the process made on request (``make_spares``) in
    the data dir's ``tmp/``, open for writing, and their names there ("" for
    an unnamed one). ``named_spares``: they must have names, flushed in
    ``tmp/`` before they are sent (one-flush filing, ``Archive._place``).
    """

    def __init__(self, index_path: str, data_dir: str, on_duplicate: str, pending_marker: str,
                 done, received_spares=None, named_spares: bool = False):
        self._arguments = (index_path, data_dir, on_duplicate, pending_marker)
        self._process = None            # started with the first jobs: a daemon that
        self._done = done               # stores nothing never pays for it
        self._sent_through = 0
        self._answered_through = 0
        self._gone = False
        self._failed = False
        self._closing = False
        self._changed = threading.Condition()
        self._received_spares = received_spares
        self._named_spares = named_spares
        self._spares_asked = False          # a request is being answered

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        # Packets, not a stream: each message keeps its own descriptors.
        self._spare_socket, child_spares = socket.socketpair(socket.AF_UNIX,
                                                             socket.SOCK_SEQPACKET)
        self._process = context.Process(
            target=_child_main, name="dicomagent-indexer", daemon=True,
            args=(child, child_spares, *self._arguments,
                  logging.getLogger().getEffectiveLevel()))
        self._process.start()
        child.close()
        child_spares.close()
        self._reader = threading.Thread(target=self._read_answers, name="indexer-answers",
                                        daemon=True)
        self._reader.start()
        self._spare_reader = threading.Thread(target=self._read_spares, name="indexer-spares",
                                              daemon=True)
        self._spare_reader.start()

    def index_jobs(self, jobs: list[IndexJob]) -> None:
        if self._process is None:
            try:
                self._start()
            except Exception as error:  # noqa: BLE001 - storage goes on without an index
                log.error("cannot start the indexer process: %s; objects stored from now on "
                          "are indexed at the next start", error)
                self._process = False
                self._gone = self._failed = True
        if self._gone:
            self._done(None, jobs[-1].sequence)
            return
        self._sent_through = jobs[-1].sequence
        try:
            self._connection.send(jobs)
        except (OSError, EOFError):
            self._done(None, jobs[-1].sequence)

    @property
    def makes_spares(self) -> bool:
        """The process is there to make temporary files (``make_spares``)."""
        return bool(self._process) and self._received_spares is not None and not self._gone

    def make_spares(self, count: int) -> None:
        """Ask for ``count`` more temporary files, unless a request is still being answered."""
        if not self.makes_spares or self._spares_asked:
            return
        self._spares_asked = True
        try:
            self._connection.send(MakeSpares(count, self._named_spares))
        except OSError:
            self._spares_asked = False      # gone: the answers thread says so

    def _read_spares(self) -> None:
        """Receive the files made (``_send_spares``), until the process is gone."""
        while True:
            try:
                tag, fds, names = _receive_spares(self._spare_socket)
            except OSError:
                return
            if fds:
                self._received_spares(fds, names)
            if not tag:
                return                      # end of file: the process has ended
            if tag == LAST_SPARES:
                self._spares_asked = False

    def wait(self) -> None:
        with self._changed:
            if self._gone or self._answered_through >= self._sent_through:
                return
        try:
            self._connection.send(SYNC)
        except OSError:
            pass
        with self._changed:
            self._changed.wait_for(
                lambda: self._gone or self._answered_through >= self._sent_through)

    def _read_answers(self) -> None:
        while True:
            try:
                results, through = self._connection.recv()
            except (OSError, EOFError):
                break
            if results is None:
                self._failed = True
            self._done(results, through)
            with self._changed:
                self._answered_through = through
                self._changed.notify_all()
        if not self._closing:
            log.error("the indexer process stopped (exit code %s): objects stored from now on "
                      "are indexed at the next start", self._process.exitcode)
        with self._changed:
            self._gone = True
            self._changed.notify_all()

    def close(self) -> None:
        """Let the process index what it has, then stop it."""
        if not self._process:
            return
        self._failed = self._gone          # it ended before it was asked to
        self._closing = True
        if not self._gone:
            try:
                self._connection.send(None)
            except OSError:
                pass
        self._process.join(60)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._reader.join(10)
        self._spare_reader.join(10)
        self._connection.close()
        self._spare_socket.close()
        if self._process.exitcode not in (0, None):
            self._failed = True
            log.error("the indexer process ended with exit code %s", self._process.exitcode)

    @property
    def failed(self) -> bool:
        """The process ended before it was asked to, or not cleanly (after ``close``)."""
        return self._failed


#: ``index.pending`` is moved forward at most this often (seconds), and a start
#: re-reads the series directories changed up to this long before its time.
PENDING_MARGIN = 60.0

#: Asks the indexer process to answer for everything it was sent (``wait``).
SYNC = "sync"


@dataclass(frozen=True, slots=True)
class MakeSpares:
    """Asks the indexer process for ``count`` empty temporary files (``make_spares``);
    ``named``: with names in ``tmp/``, flushed there before they are sent."""
    count: int
    named: bool = False


#: Files per message on the spares socket (the kernel takes up to 253 descriptors in one).
SPARES_PER_MESSAGE = 64
#: How each message on the spares socket starts: more follow, or the answer is complete.
#: Then the files' names in ``tmp/``, one per descriptor, separated by newlines (empty
#: for an unnamed file).
MORE_SPARES, LAST_SPARES = b"+", b"."


def _receive_spares(spares: socket.socket) -> tuple[bytes, list[int], list[str]]:
    """One message of ``_send_spares``: its tag (empty at the end of the stream), its
    descriptors, their names. Programs the daemon runs do not inherit the descriptors
    (as they inherit none of its own files); Python 3.11's ``socket.recv_fds`` drops
    its ``flags``, hence ``recvmsg`` itself."""
    fds = array.array("i")
    data, ancillary, _, _ = spares.recvmsg(
        4096, socket.CMSG_SPACE(SPARES_PER_MESSAGE * fds.itemsize),
        getattr(socket, "MSG_CMSG_CLOEXEC", 0))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    names = data[1:].decode("ascii").split("\n") if fds else []
    return data[:1], list(fds), names


#: The indexer process answers at the latest after this many jobs or seconds
#: (sooner when asked): the daemon needs its answers only to know how far
#: behind it is, and every answer costs the daemon a thread switch.
ANSWER_EVERY = 256
ANSWER_AFTER = 0.2


def _child_main(connection, spares: socket.socket, index_path: str, data_dir: str,
                on_duplicate: str, pending_marker: str, log_level: int) -> None:
    """The indexer process: batches of jobs in, (results, last sequence) out; the
    results are those of the jobs somebody waits for (``IndexJob.answer``). Requests
    for temporary files (``MakeSpares``) are answered first, on ``spares``.

    It stops when the daemon says so (None) or is gone (end of file), after
    indexing what it has; signals are the daemon's to handle (a Ctrl-C or a
    SIGTERM to the process group must not cut a batch short).

    Its commits are not flushed one by one (SQLite ``synchronous=NORMAL``):
    the index can be rebuilt from the files, and a flush per batch would
    compete with the flushes that acknowledge objects. The write-ahead log is
    flushed before ``index.pending`` is moved forward (when the index has
    been idle, at most every ``PENDING_MARGIN`` seconds) and before the
    process ends, after which the daemon removes the marker.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Receiving comes first: the event loop answers senders, the index can trail (by
    # MAX_BACKLOG objects at most), so on a busy machine this process yields the CPU.
    os.nice(10)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: "
                                                "%(message)s")
    index = SQLiteIndex(index_path, durable=False)
    gc.freeze()                     # pydicom's dictionaries: out of full collections
    unanswered = 0                  # jobs indexed since the last answer
    results: list[IndexResult] = []     # of those, the ones somebody waits for
    through = 0
    answered_at = marked_at = time.monotonic()
    try:
        while True:
            jobs: list[IndexJob] = []
            asked = stop = False
            spares_wanted, spares_named = 0, False
            wait = ANSWER_AFTER if unanswered else None
            while len(jobs) < 1024 and connection.poll(0 if jobs or asked or spares_wanted
                                                       else wait):
                try:
                    message = connection.recv()
                except EOFError:
                    message = None
                if message is None:
                    stop = True
                    break
                if type(message) is MakeSpares:
                    spares_wanted += message.count
                    spares_named = message.named
                elif message == SYNC:
                    asked = True
                else:
                    jobs.extend(message)
            if spares_wanted and not stop:
                _send_spares(spares, os.path.join(data_dir, "tmp"), spares_wanted, spares_named)
            failed = False
            if jobs:
                try:
                    indexed = index_jobs(index, data_dir, on_duplicate, jobs)
                    results += [result for job, result in zip(jobs, indexed) if job.answer]
                except Exception as error:  # noqa: BLE001 - a database failure
                    log.error("index write failed: %s; %d stored object(s) are not in the "
                              "index until the next start", error, len(jobs))
                    failed = True
                through = jobs[-1].sequence
                unanswered += len(jobs)
            if (failed or asked or stop or unanswered >= ANSWER_EVERY
                    or any(job.answer for job in jobs)
                    or (unanswered and time.monotonic() - answered_at >= ANSWER_AFTER)
                    or (not jobs and unanswered)):
                try:
                    connection.send((None if failed else results, through))
                except OSError:
                    return              # the daemon is gone; what was indexed is committed
                unanswered, results = 0, []
                answered_at = time.monotonic()
                if not jobs and answered_at - marked_at >= PENDING_MARGIN:
                    _flush_log(index_path)
                    _touch(pending_marker)
                    marked_at = answered_at
            if stop:
                return
    finally:
        _flush_log(index_path)
        index.close()


def _send_spares(spares: socket.socket, tmp_dir: str, count: int, named: bool = False) -> None:
    """Make ``count`` empty files in ``tmp_dir`` as the event loop would have made them
    (``create_temporary``: unnamed where the file system can, unless ``named``) and
    send them, open, with their names, ``SPARES_PER_MESSAGE`` to a message. Named ones
    are sent only once ``tmp_dir`` is flushed: their names are on stable storage before
    a data set is written into one. Unnamed ones vanish with their last descriptor
    whatever happens; a named one sent is the daemon's (it is left in ``tmp/`` for
    the next start when unused)."""
    made: list[tuple[str, int, bool]] = []
    try:
        for _ in range(count):
            made.append(create_temporary(tmp_dir, ".spare", named=named))
        if named and made:
            fsync_directory(tmp_dir)
    except OSError as error:
        log.warning("cannot create temporary files ahead: %s", error.strerror)
        if named:                           # not known to be flushed: none of them
            for path, fd, _ in made:
                os.close(fd)
                try:
                    os.unlink(path)
                except OSError:
                    pass                    # an empty .spare: the next start takes it
            made = []
    parts = [made[start:start + SPARES_PER_MESSAGE]
             for start in range(0, len(made), SPARES_PER_MESSAGE)] or [[]]
    try:
        for number, part in enumerate(parts, 1):
            tag = LAST_SPARES if number == len(parts) else MORE_SPARES
            if part:
                names = "\n".join(os.path.basename(path) if is_named else ""
                                   for path, _, is_named in part)
                socket.send_fds(spares, [tag + names.encode("ascii")],
                                [fd for _, fd, _ in part])
            else:
                spares.send(tag)
    except OSError:
        pass                                # the daemon is gone; named ones stay in tmp/
    finally:
        for _, fd, _ in made:
            os.close(fd)


def _flush_log(index_path: str) -> None:
    """Make every commit so far durable: flush the write-ahead log (what was checkpointed
    out of it, SQLite flushed already)."""
    try:
        fd = os.open(index_path + "-wal", os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _touch(marker: str) -> None:
    """Move ``index.pending`` forward: everything filed up to ``PENDING_MARGIN`` seconds
    ago is in the index (a filing still on its way is younger than that)."""
    try:
        os.utime(marker)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("cannot refresh %s: %s", marker, error.strerror)
