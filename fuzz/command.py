"""Fuzz the PS3.7 command set codec and message assembly (atheris).

Invariants, for any input:

1. ``decode_command(data)`` returns a message or raises ``CommandDecodeError``,
   nothing else;
2. what decodes re-encodes, and decode -> encode -> decode agrees;
3. ``MessageAssembler`` given the bytes as the command set of one message, in two
   fragments cut at a point taken from the data, raises only ``DIMSEProtocolError``
   and gives the message ``decode_command`` gives.

Run::

    python fuzz/command.py -max_total_time=20 [CORPUS_DIR ...] [libFuzzer flags]

With no corpus directory, a seed corpus is written (from code, not committed) to
``fuzz/corpus-command/`` and used.

References
----------
PS3.7 §6.3.1 (command set encoding), Annex E (command dictionary); PS3.8 Annex E.2.
"""

from __future__ import annotations

import sys

import atheris
from _corpus import corpus_args

with atheris.instrument_imports():
    from dicomagent.dimse.commands import (MESSAGES, CommandDecodeError, decode_command,
                                           encode_command)
    from dicomagent.dimse.messages import DIMSEProtocolError, MessageAssembler
    from dicomagent.ul.pdu import MCH_COMMAND, MCH_LAST
    from dicomagent.ul.primitives import PDataIndication


def assemble(data: bytes, cut: int):
    """The command set as two PDVs on context 1: the message, or None if refused."""
    assembler = MessageAssembler()
    try:
        first = assembler.receive(PDataIndication(1, MCH_COMMAND, memoryview(data[:cut]), True))
        if first is not None:
            raise AssertionError("a message completed before its last fragment")
        return assembler.receive(PDataIndication(1, MCH_COMMAND | MCH_LAST,
                                                 memoryview(data[cut:]), True))
    except DIMSEProtocolError:
        return None


def TestOneInput(data: bytes) -> None:
    try:
        message = decode_command(data)
    except CommandDecodeError:
        message = None
    if message is not None:
        again = decode_command(encode_command(message))
        if again != message:
            raise AssertionError(f"decode -> encode -> decode disagrees:\n{message!r}\n"
                                 f"{again!r}")

    cut = (data[0] * 257 + len(data)) % (len(data) + 1) if data else 0
    received = assemble(data, cut)
    if message is None:
        if received is not None:
            raise AssertionError(f"the assembler accepted what decode_command refused: "
                                 f"{received!r}")
    elif received is not None:
        if received.command != message:
            raise AssertionError(f"the assembler gave {received.command!r}, "
                                 f"decode_command {message!r}")
    elif len(data) <= 64 * 1024 and not message.has_data_set:
        raise AssertionError(f"the assembler refused a command decode_command takes: "
                             f"{message!r}")


def seeds() -> list[bytes]:
    """One command set per message class, with typical values."""
    values = {
        "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "RequestedSOPClassUID": "1.2.840.10008.5.1.1.14",
        "AffectedSOPInstanceUID": "1.2.826.0.1.3680043.9.1.2.3",
        "RequestedSOPInstanceUID": "1.2.826.0.1.3680043.9.1.2",
        "MessageID": 7, "MessageIDBeingRespondedTo": 7, "Priority": 0,
        "MoveDestination": "STORESCP", "Status": 0xFF00,
        "OffendingElement": (0x00100010,), "ErrorComment": "no such patient",
        "ErrorID": 1, "EventTypeID": 1, "ActionTypeID": 1,
        "AttributeIdentifierList": (0x00080016, 0x00080018),
        "NumberOfRemainingSuboperations": 3, "NumberOfCompletedSuboperations": 2,
        "NumberOfFailedSuboperations": 0, "NumberOfWarningSuboperations": 1,
        "MoveOriginatorApplicationEntityTitle": "MOVESCU", "MoveOriginatorMessageID": 3,
    }
    out = []
    for cls in MESSAGES.values():
        fields = {name: values[name] for name in cls.FIELD_ORDER if name in values}
        out.append(encode_command(cls(**fields)))
    return out


if __name__ == "__main__":
    for seed in seeds():           # the seeds themselves must pass
        TestOneInput(seed)
    atheris.Setup(corpus_args(sys.argv, "command", seeds()), TestOneInput)
    atheris.Fuzz()
