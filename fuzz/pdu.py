"""Fuzz the PS3.8 §9.3 PDU codecs and the streaming PDU reader (atheris).

Invariants, for any input:

1. ``decode_pdu(data)`` returns a PDU or raises ``PDUDecodeError``, nothing else;
2. what decodes re-encodes to the same PDU: ``decode_pdu(pdu.encode()) == pdu``;
3. ``PDUReader`` fed the bytes whole and fed them in two chunks (cut at a point
   taken from the data) raises only ``PDUDecodeError``, and both feeds give the same
   PDUs, the same PDV values and the same error;
4. a PDU that ``decode_pdu`` accepts is what the reader reports for the same bytes;
5. a ``ULConnection`` (acceptor in Sta2, and one in Sta6) fed the bytes in two chunks
   raises nothing (PDUDecodeError becomes Evt19 inside it), and outputs nothing
   after CLOSE_TRANSPORT.

Run::

    python fuzz/pdu.py -max_total_time=20 [CORPUS_DIR ...] [libFuzzer flags]

With no corpus directory, a seed corpus is written (from code, not committed) to
``fuzz/corpus-pdu/`` and used.

References
----------
PS3.8 §9.3 (PDUs), §9.3.5 and Annex E (P-DATA-TF, PDVs).
"""

from __future__ import annotations

import sys

import atheris
from _corpus import corpus_args

with atheris.instrument_imports():
    from dicomagent.ul.codes import PDUDecodeError
    from dicomagent.ul.connection import CLOSE_TRANSPORT, ULConnection
    from dicomagent.ul.items import (ApplicationContextItem, AsynchronousOperationsWindowSubItem,
                                     ImplementationClassUIDSubItem,
                                     ImplementationVersionNameSubItem, MaximumLengthSubItem,
                                     PresentationContextItemAC, PresentationContextItemRQ,
                                     SCPSCURoleSelectionSubItem,
                                     SOPClassCommonExtendedNegotiationSubItem,
                                     SOPClassExtendedNegotiationSubItem, UnknownItem,
                                     UserIdentitySubItemAC, UserIdentitySubItemRQ,
                                     UserInformationItem)
    from dicomagent.ul.pdu import (A_ABORT, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ,
                                   A_RELEASE_RP, A_RELEASE_RQ, MAX_CONTROL_PDU_LENGTH, P_DATA_TF,
                                   PresentationDataValueItem, decode_pdu)
    from dicomagent.ul.primitives import AAssociateResponse
    from dicomagent.ul.stream import PDUReader


class Recorder:
    """PDUReader owner: writes down each callback, copying each view at once."""

    def __init__(self):
        self.calls = []

    def on_pdu(self, pdu):
        self.calls.append(("pdu", pdu))

    def on_p_data_tf(self):
        self.calls.append(("p-data-tf",))

    def on_pdv(self, context_id, message_control_header, fragment, pdv_complete):
        self.calls.append(("pdv", context_id, message_control_header, bytes(fragment),
                           pdv_complete))

    def normalised(self):
        """The calls with each PDV's pieces joined; a PDV still open is marked partial."""
        out, pending = [], None
        for call in self.calls:
            if call[0] != "pdv":
                if pending is not None:
                    raise AssertionError("a PDV was interrupted by another PDU")
                out.append(call)
                continue
            _, cid, mch, piece, complete = call
            if pending is None:
                pending = [cid, mch, b""]
            elif (cid, mch) != (pending[0], pending[1]):
                raise AssertionError("a PDV changed context or control header mid-way")
            pending[2] += piece
            if complete:
                out.append(("pdv", *pending))
                pending = None
        if pending is not None:
            out.append(("pdv-partial", *pending))
        return out


def read(chunks):
    """Feed the chunks to a fresh reader: (normalised calls, outcome)."""
    owner = Recorder()
    reader = PDUReader(owner)
    try:
        for chunk in chunks:
            reader.feed(chunk)
    except PDUDecodeError as error:
        if not reader.failed:
            raise AssertionError("PDUReader raised but did not stop") from error
        return owner.normalised(), ("error", error.field, error.reason)
    return owner.normalised(), ("ok", reader.idle)


RQ = A_ASSOCIATE_RQ("A", "B", (
    ApplicationContextItem("1.2.840.10008.3.1.1.1"),
    PresentationContextItemRQ(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",))))
AC = A_ASSOCIATE_AC("A", "B", (
    ApplicationContextItem("1.2.840.10008.3.1.1.1"),
    PresentationContextItemAC(1, 0, "1.2.840.10008.1.2")))


def connections() -> list:
    """A fresh acceptor in Sta2 and one in Sta6."""
    waiting = ULConnection(False)
    waiting.connection_made()
    established = ULConnection(False)
    established.connection_made()
    established.receive_data(RQ.encode())
    established.associate_response(AAssociateResponse(ac=AC))
    return [waiting, established]


def check_connection(connection, chunks) -> None:
    connection.take_outputs()
    outputs = []
    for chunk in chunks:
        connection.receive_data(chunk)
        outputs += connection.take_outputs()
    if CLOSE_TRANSPORT in outputs and outputs.index(CLOSE_TRANSPORT) != len(outputs) - 1:
        raise AssertionError(f"output after CLOSE_TRANSPORT: {outputs!r}")


def TestOneInput(data: bytes) -> None:
    # 1, 2: the whole-PDU decoder.
    try:
        pdu = decode_pdu(data)
    except PDUDecodeError:
        pdu = None
    if pdu is not None:
        again = decode_pdu(pdu.encode())
        if again != pdu:
            raise AssertionError(f"decode -> encode -> decode disagrees:\n{pdu!r}\n{again!r}")

    # 3: the streaming reader, whole and in two chunks.
    cut = (data[0] * 257 + len(data)) % (len(data) + 1) if data else 0
    whole = read([data])
    split = read([data[:cut], data[cut:]])
    if whole != split:
        raise AssertionError(f"cut at {cut} changes what the reader reports:\n{whole!r}\n"
                             f"{split!r}")

    # 4: the two decoders agree on a whole PDU.
    if pdu is not None and len(data) - 6 <= MAX_CONTROL_PDU_LENGTH:
        if type(pdu) is P_DATA_TF:
            expected = [("p-data-tf",)] + [("pdv", v.context_id, v.message_control_header,
                                             v.data) for v in pdu.pdvs]
        else:
            expected = [("pdu", pdu)]
        if whole != (expected, ("ok", True)):
            raise AssertionError(f"decode_pdu gave {pdu!r}, the reader {whole!r}")

    # 5: the state machine takes anything from the wire.
    for connection in connections():
        check_connection(connection, [data[:cut], data[cut:]])


def seeds() -> list[bytes]:
    """A few valid PDUs of every type, and a stream of several."""
    ui = UserInformationItem((
        MaximumLengthSubItem(16384), ImplementationClassUIDSubItem("1.2.826.0.1.3680043.9"),
        AsynchronousOperationsWindowSubItem(1, 1),
        SCPSCURoleSelectionSubItem("1.2.840.10008.5.1.4.1.1.2", 1, 1),
        ImplementationVersionNameSubItem("DICOMAGENT"),
        SOPClassExtendedNegotiationSubItem("1.2.840.10008.5.1.4.1.2.2.1", b"\x01\x01"),
        SOPClassCommonExtendedNegotiationSubItem("1.2.840.10008.5.1.4.1.1.2",
                                                 "1.2.840.10008.4.2", ("1.2.3",)),
        UserIdentitySubItemRQ(2, 1, b"user", b"secret"), UnknownItem(0x5F, b"?")))
    rq = A_ASSOCIATE_RQ("A", "B", (
        ApplicationContextItem("1.2.840.10008.3.1.1.1"),
        PresentationContextItemRQ(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",)),
        PresentationContextItemRQ(3, "1.2.840.10008.5.1.4.1.1.2",
                                  ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")),
        ui, UnknownItem(0x77, b"xy")))
    ac = A_ASSOCIATE_AC("A", "B", (
        ApplicationContextItem("1.2.840.10008.3.1.1.1"),
        PresentationContextItemAC(1, 0, "1.2.840.10008.1.2"),
        PresentationContextItemAC(3, 3),
        UserInformationItem((MaximumLengthSubItem(0), UserIdentitySubItemAC(b"ok")))))
    p_data = P_DATA_TF((PresentationDataValueItem(1, 3, b"\x00\x00\x00\x00\x04\x00\x00\x00"),
                        PresentationDataValueItem(1, 0, b""),
                        PresentationDataValueItem(1, 2, b"data set")))
    pdus = [rq, ac, A_ASSOCIATE_RJ(1, 1, 7), p_data, A_RELEASE_RQ(), A_RELEASE_RP(),
            A_ABORT(2, 6)]
    encoded = [pdu.encode() for pdu in pdus]
    return encoded + [b"".join(encoded[3:]), encoded[3] + encoded[6] + encoded[3]]


if __name__ == "__main__":
    for seed in seeds():           # the seeds themselves must pass
        TestOneInput(seed)
    atheris.Setup(corpus_args(sys.argv, "pdu", seeds()), TestOneInput)
    atheris.Fuzz()
