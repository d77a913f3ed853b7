"""A data set on its way into the archive: streamed to a temporary file.

``IncomingFile`` is the sink (``write`` / ``finish`` / ``discard``) that the
DIMSE layer fills while a C-STORE data set arrives. The Part 10 header
(everything it needs is in the C-STORE-RQ and the presentation context)
goes to the file with the first PDV fragment, in one ``os.writev``; each
fragment goes from the receive buffer to the file with no copy. The first ``HEAD_LIMIT`` bytes
are also kept in memory, so the attributes the index needs can usually be
parsed without reading the file back.

Nothing here is in the archive yet. The file is normally one that the
archive's worker made ahead: unnamed where the file system allows it (Linux
``O_TMPFILE``), so that a crash leaves nothing behind, else a named file in
``tmp/`` (removed at the next start unless empty) — and always named, a
``.spare`` file, with fsync on. Then its CRC-32 is kept as it is written:
filing seals it (``SEAL``) before its one flush, so that a restart can tell
a complete file from whatever a power cut left of one.
"""

from __future__ import annotations

import errno
import os
import secrets
import struct
import zlib

from dicomagent.archive.part10 import file_meta_information

#: Bytes of the data set kept in memory for parsing the header attributes.
HEAD_LIMIT = 64 * 1024

#: With ``write_ahead`` (``storage.fsync`` on), write-back starts every this many bytes.
WRITE_AHEAD = 256 * 1024

#: Whether write-back can be started early: Linux starts it for ``POSIX_FADV_DONTNEED``
#: (other systems may lack ``posix_fadvise``; there the flush does it all).
_CAN_WRITE_AHEAD = hasattr(os, "posix_fadvise")


def write_all(fd: int, data, before: bytes = b"") -> None:
    """``os.write`` until every byte is written (regular files rarely write short);
    ``before``, if given, goes first in the same system call."""
    view = memoryview(data)
    if before:
        written = os.writev(fd, (before, view))
        if written < len(before):
            write_all(fd, memoryview(before)[written:])
            written = len(before)
        view = view[written - len(before):]
    while view:
        written = os.write(fd, view)
        view = view[written:]


#: Whether unnamed files (``O_TMPFILE``, linked through /proc/self/fd) work here;
#: None until the first try.
_unnamed_files: bool | None = None


def create_temporary(tmp_dir: str, suffix: str = ".part", named: bool = False
                     ) -> tuple[str, int, bool]:
    """A new empty file for a data set, open for writing: (path, fd, named).

    Unnamed where the file system can (``path`` is then /proc/self/fd/FD,
    to read it by), else (or when asked: ``named``) a named file in
    ``tmp_dir``. The archive's worker creates some ahead (an empty named
    ``.spare`` file in ``tmp/`` is one waiting for a data set).
    """
    global _unnamed_files
    if _unnamed_files is None:
        _unnamed_files = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
    if _unnamed_files and not named:
        try:
            fd = os.open(tmp_dir, os.O_WRONLY | os.O_TMPFILE, 0o644)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            _unnamed_files = False          # not on this file system: named files
        else:
            return f"/proc/self/fd/{fd}", fd, False
    path = os.path.join(tmp_dir, f"{secrets.token_hex(8)}{suffix}")
    return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), True


def fsync_directory(directory: str) -> None:
    """Flush a directory: the names made or removed in it reach stable storage."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: The extended attribute that seals a received file with its size and CRC-32,
#: set just before its one flush (``storage.fsync``: ``Archive._place``). A file
#: in ``tmp/`` whose bytes match its seal was complete when it was flushed; any
#: other was not, whatever a power cut left of it.
SEAL = "user.dicomagent.seal"
_SEAL = struct.Struct("<QI")


def seal(fd: int, size: int, crc: int) -> None:
    os.setxattr(fd, SEAL, _SEAL.pack(size, crc))


def is_sealed_intact(path: str) -> bool:
    """True when the file at ``path`` carries a seal and its bytes match it."""
    try:
        size, crc = _SEAL.unpack(os.getxattr(path, SEAL))
    except (OSError, struct.error):
        return False
    return os.path.getsize(path) == size and file_crc32(path) == crc


def file_crc32(path: str) -> int:
    """The CRC-32 of a whole file (what the seal and the index keep)."""
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def can_seal(directory: str) -> bool:
    """Whether files in ``directory`` take extended attributes (``SEAL``)."""
    fd, path = -1, os.path.join(directory, f"{secrets.token_hex(8)}.spare")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        seal(fd, 0, 0)
        return True
    except OSError:
        return False
    finally:
        if fd >= 0:
            os.close(fd)
            os.unlink(path)


#: Any directory: given as a directory fd, it makes Python call linkat(2) (with no
#: directory fd, ``os.link`` calls link(2), which would link the /proc symlink itself).
_ROOT_FD: int | None = None


def _link_following(source: str, target: str) -> None:
    """linkat(AT_FDCWD, source, AT_FDCWD, target, AT_SYMLINK_FOLLOW) for absolute paths."""
    global _ROOT_FD
    if _ROOT_FD is None:
        _ROOT_FD = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    os.link(source, target, src_dir_fd=_ROOT_FD, follow_symlinks=True)


class IncomingFile:
    """One C-STORE data set being received into ``tmp_dir``.

    ``failure`` is set (to "out-of-resources" or another short reason) when
    the data set cannot be kept; the remaining fragments are then dropped.
    """

    __slots__ = ("tmp_dir", "path", "fd", "named", "write_ahead", "written_back", "head", "size",
                 "data_offset", "unwritten", "failure", "crc",
                 "sop_class_uid", "sop_instance_uid", "transfer_syntax", "calling_ae_title",
                 "received_at")

    def __init__(self, tmp_dir: str, sop_class_uid: str, sop_instance_uid: str,
                 transfer_syntax: str, calling_ae_title: str, received_at: float,
                 spare: tuple[str, int, bool] | None = None, write_ahead: bool = False,
                 checksum: bool = False):
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax = transfer_syntax
        self.calling_ae_title = calling_ae_title
        self.received_at = received_at
        self.failure = ""
        self.head = bytearray()
        header = file_meta_information(sop_class_uid, sop_instance_uid, transfer_syntax,
                                       calling_ae_title or None)
        self.data_offset = len(header)
        self.size = len(header)
        #: The header, until the first fragment goes with it (one system call).
        self.unwritten = header
        #: CRC-32 of the file so far, kept when asked (``checksum``) for its seal.
        self.crc = zlib.crc32(header) if checksum else None
        self.tmp_dir = tmp_dir
        self.fd = -1
        self.path = ""
        self.named = False
        self.write_ahead = write_ahead and _CAN_WRITE_AHEAD
        self.written_back = 0
        try:
            if spare is not None:
                self.path, self.fd, self.named = spare
            else:
                self.path, self.fd, self.named = create_temporary(tmp_dir)
        except OSError as error:
            self._fail(error)

    @classmethod
    def refused(cls, reason: str, sop_instance_uid: str = "",
                calling_ae_title: str = "") -> "IncomingFile":
        """A sink that drops the data set (e.g. not enough free space: A700)."""
        incoming = cls.__new__(cls)
        incoming.tmp_dir = incoming.path = ""
        incoming.fd = -1
        incoming.named = incoming.write_ahead = False
        incoming.written_back = 0
        incoming.head = bytearray()
        incoming.size = incoming.data_offset = 0
        incoming.unwritten = b""
        incoming.crc = None
        incoming.failure = reason
        incoming.sop_class_uid = incoming.transfer_syntax = ""
        incoming.sop_instance_uid = sop_instance_uid
        incoming.calling_ae_title = calling_ae_title
        incoming.received_at = 0.0
        return incoming

    def _fail(self, error: OSError) -> None:
        self.failure = ("out-of-resources" if error.errno in (errno.ENOSPC, errno.EDQUOT)
                        else f"cannot write: {error.strerror}")
        self.discard()

    def write(self, fragment) -> None:
        if self.fd < 0:
            return
        try:
            write_all(self.fd, fragment, self.unwritten)
        except OSError as error:
            self._fail(error)
            return
        self.unwritten = b""
        self.size += len(fragment)
        if self.crc is not None:
            self.crc = zlib.crc32(fragment, self.crc)
        if len(self.head) < HEAD_LIMIT:
            self.head += fragment[:HEAD_LIMIT - len(self.head)]
        if self.write_ahead and self.size - self.written_back >= WRITE_AHEAD:
            # Start writing back the whole pages received so far (Linux: DONTNEED
            # starts write-back of dirty pages), so the final fdatasync waits less.
            end = self.size & ~0xFFF
            os.posix_fadvise(self.fd, self.written_back, end - self.written_back,
                             os.POSIX_FADV_DONTNEED)
            self.written_back = end

    def put_in_place(self, final_path: str, replace: bool = True) -> None:
        """Give the received file its final name (the directory must exist).

        A named temporary file is renamed. An unnamed one (``O_TMPFILE``) is
        linked: linkat(2) with AT_SYMLINK_FOLLOW through /proc/self/fd. A link
        never replaces a file: when one is there (a duplicate to replace, or
        two copies at once), it is linked under a temporary name in ``tmp/``
        (where a crash leaves it to the next start's clean-up) and renamed over it.
        Without ``replace``, a file already there raises ``FileExistsError``.
        """
        if self.named:
            if replace:
                os.replace(self.path, final_path)
            else:
                os.link(self.path, final_path)
                os.unlink(self.path)
            return
        try:
            _link_following(self.path, final_path)
        except FileExistsError:
            if not replace:
                raise
            staged = os.path.join(self.tmp_dir, f"{secrets.token_hex(8)}.part")
            _link_following(self.path, staged)
            try:
                os.replace(staged, final_path)
            except OSError:
                os.unlink(staged)
                raise

    def finish(self) -> "IncomingFile":
        """The data set is complete (the header is written even when it was empty)."""
        if self.unwritten and self.fd >= 0:
            try:
                write_all(self.fd, self.unwritten)
            except OSError as error:
                self._fail(error)
            self.unwritten = b""
        return self

    @property
    def complete_in_head(self) -> bool:
        """True when the whole data set is in ``head``."""
        return self.size - self.data_offset == len(self.head)

    def discard(self) -> None:
        """Drop the temporary file (association aborted, or the data set refused)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.path and self.named:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.path = ""
