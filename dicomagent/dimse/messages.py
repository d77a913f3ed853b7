"""PS3.7 §6.3 and PS3.8 Annex E: DIMSE messages out of P-DATA fragments.

A DIMSE message is a command set, then (if the command says so) a data set,
each sent as one or more PDV fragments on one presentation context; the
Message Control Header of each fragment says command or data set, and marks
the last fragment (PS3.8 Annex E.2).

``MessageAssembler.receive`` takes the P-DATA indications of the Upper
Layer one piece at a time. The command set is collected in memory (it is
small, and bounded here); the data set goes, piece by piece, to a *sink*
chosen by the caller once the command is known, so a C-STORE data set can
go straight to a file and nothing requires a whole data set in memory.

References
----------
PS3.7 §6.3 (message structure), §9.3 / §10.3 (which messages carry a data
set); PS3.8 Annex E (Presentation Data Value, Message Control Header).
"""

from __future__ import annotations

from dataclasses import dataclass

from dicomagent.dimse.commands import CommandDecodeError, Message, decode_command
from dicomagent.ul.pdu import MCH_COMMAND, MCH_LAST

#: A command set larger than this is refused. Local extension: PS3.7 sets no
#: limit; real command sets are well under 1 KiB.
MAX_COMMAND_SET_LENGTH = 64 * 1024


class DIMSEProtocolError(Exception):
    """Fragments that do not make a DIMSE message; the association is aborted."""


class MemorySink:
    """Collects a (small) data set in memory, up to ``limit`` bytes."""

    __slots__ = ("_buffer", "_limit")

    def __init__(self, limit: int = 64 * 1024 * 1024):
        self._buffer = bytearray()
        self._limit = limit

    def write(self, fragment) -> None:
        if len(self._buffer) + len(fragment) > self._limit:
            raise DIMSEProtocolError(f"data set larger than {self._limit} bytes")
        self._buffer += fragment

    def finish(self) -> bytes:
        return bytes(self._buffer)

    def discard(self) -> None:
        self._buffer = bytearray()


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One whole DIMSE message: its context, command, and data set (what the sink made)."""

    context_id: int
    command: Message
    data_set: object = None


class MessageAssembler:
    """P-DATA indications in, ``ReceivedMessage`` out.

    Parameters
    ----------
    open_sink : callable
        ``open_sink(context_id, command)`` returns the sink (``write``,
        ``finish``, ``discard``) for the data set the command announces.
    """

    __slots__ = ("_open_sink", "_command", "_context_id", "_message", "_sink")

    def __init__(self, open_sink=None):
        self._open_sink = open_sink or (lambda context_id, command: MemorySink())
        self._command = bytearray()
        self._context_id = 0
        self._message: Message | None = None     # command received, data set pending
        self._sink = None

    @property
    def idle(self) -> bool:
        """No message is half received."""
        return self._message is None and not self._command

    def receive(self, indication) -> ReceivedMessage | None:
        """Take one P-DATA indication; return a message when one is complete."""
        mch = indication.message_control_header
        context_id = indication.context_id
        if mch & MCH_COMMAND:
            if self._message is not None:
                raise DIMSEProtocolError("command fragment while a data set was expected")
            if self._command and context_id != self._context_id:
                raise DIMSEProtocolError(f"command fragment on context {context_id} in the "
                                         f"middle of a command on context {self._context_id}")
            self._context_id = context_id
            if len(self._command) + len(indication.fragment) > MAX_COMMAND_SET_LENGTH:
                raise DIMSEProtocolError("command set longer than 64 KiB")
            self._command += indication.fragment
            if not (indication.pdv_complete and mch & MCH_LAST):
                return None
            data, self._command = self._command, bytearray()
            try:
                command = decode_command(data)
            except CommandDecodeError as error:
                raise DIMSEProtocolError(f"invalid command set: {error}") from None
            if not command.has_data_set:
                return ReceivedMessage(context_id, command)
            self._message = command
            self._sink = self._open_sink(context_id, command)
            return None
        # A data set fragment.
        if self._message is None:
            raise DIMSEProtocolError("data set fragment before its command")
        if context_id != self._context_id:
            raise DIMSEProtocolError(f"data set on context {context_id} for a command on "
                                     f"context {self._context_id}")
        self._sink.write(indication.fragment)
        if not (indication.pdv_complete and mch & MCH_LAST):
            return None
        command, sink = self._message, self._sink
        self._message = self._sink = None
        return ReceivedMessage(context_id, command, sink.finish())

    def abandon(self) -> None:
        """The association ended mid-message: let the sink drop what it has."""
        if self._sink is not None:
            self._sink.discard()
        self._message = self._sink = None
        self._command = bytearray()
