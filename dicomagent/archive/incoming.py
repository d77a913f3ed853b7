"""A data set on its way into the archive: streamed to a temporary file.

``IncomingFile`` is the sink (``write`` / ``finish`` / ``discard``) that the
DIMSE layer fills while a C-STORE data set arrives. The Part 10 header is
written first (everything it needs is in the C-STORE-RQ and the
presentation context); each PDV fragment then goes from the receive buffer
to the file with ``os.write``, with no copy. The first ``HEAD_LIMIT`` bytes
are also kept in memory, so the attributes the index needs can usually be
parsed without reading the file back.

Nothing here is in the archive yet: the file lives under ``tmp/`` until the
archive's worker has checked it, flushed it and renamed it into place.
"""

from __future__ import annotations

import errno
import os
import secrets

from dicomagent.archive.part10 import file_meta_information

#: Bytes of the data set kept in memory for parsing the header attributes.
HEAD_LIMIT = 64 * 1024


def write_all(fd: int, data) -> None:
    """``os.write`` until every byte is written (regular files rarely write short)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def create_temporary(tmp_dir: str, suffix: str = ".part") -> tuple[str, int]:
    """A new empty file in ``tmp_dir``, open for writing: (path, fd).

    The archive's worker creates some ahead with the suffix ``.spare``: an
    empty ``.spare`` file in ``tmp/`` is one waiting for a data set.
    """
    path = os.path.join(tmp_dir, f"{secrets.token_hex(8)}{suffix}")
    return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)


class IncomingFile:
    """One C-STORE data set being received into ``tmp_dir``.

    ``failure`` is set (to "out-of-resources" or another short reason) when
    the data set cannot be kept; the remaining fragments are then dropped.
    """

    __slots__ = ("path", "fd", "head", "size", "data_offset", "failure",
                 "sop_class_uid", "sop_instance_uid", "transfer_syntax", "calling_ae_title",
                 "received_at")

    def __init__(self, tmp_dir: str, sop_class_uid: str, sop_instance_uid: str,
                 transfer_syntax: str, calling_ae_title: str, received_at: float,
                 spare: tuple[str, int] | None = None):
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
        self.fd = -1
        try:
            if spare is not None:
                self.path, self.fd = spare
            else:
                self.path, self.fd = create_temporary(tmp_dir)
            write_all(self.fd, header)
        except OSError as error:
            self._fail(error)

    @classmethod
    def refused(cls, reason: str, sop_instance_uid: str = "",
                calling_ae_title: str = "") -> "IncomingFile":
        """A sink that drops the data set (e.g. not enough free space: A700)."""
        incoming = cls.__new__(cls)
        incoming.path = ""
        incoming.fd = -1
        incoming.head = bytearray()
        incoming.size = incoming.data_offset = 0
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
            write_all(self.fd, fragment)
        except OSError as error:
            self._fail(error)
            return
        self.size += len(fragment)
        if len(self.head) < HEAD_LIMIT:
            self.head += fragment[:HEAD_LIMIT - len(self.head)]

    def finish(self) -> "IncomingFile":
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
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = ""
