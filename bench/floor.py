#!/usr/bin/env python3
"""A measuring stick, not a product: the least a Python C-STORE SCP can do per object.

``bench/store.py --servers ...,python-floor`` runs it beside dicomagent. It answers every
C-STORE with Success after writing the data set to a file named by the command's Affected
SOP Instance UID (and, with ``--fsync``, flushing it), on asyncio + uvloop like dicomagent,
with none of dicomagent's layers: no Upper Layer state machine or primitives, no DIMSE
message objects, no File Meta Information, no check of the data set, no index, no
temporary file. What it leaves out is what a real node must do; what it measures is how
fast Python itself can go around one C-STORE on this machine, so that the gap between
dicomagent and DCMTK's storescp can be split into "Python" and "dicomagent's own work".

    python3 bench/floor.py --port PORT --dir DIR [--fsync]

The association is accepted whatever it proposes (each presentation context with its
first transfer syntax); A-RELEASE-RQ is answered, anything else closes the connection.
It is made for small objects: it copies each PDU a few times on its way in (dicomagent
keeps views of what it received), which costs on large ones such as CT images.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import struct

import uvloop

from dicomagent.ul.items import (ApplicationContextItem, ImplementationClassUIDSubItem,
                                 MaximumLengthSubItem, PresentationContextItemAC,
                                 UserInformationItem)
from dicomagent.ul.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from dicomagent.uids import IMPLEMENTATION_CLASS_UID

PDU_HEADER = struct.Struct(">BxI")          # PDU type, reserved, PDU length
PDV_HEADER = struct.Struct(">IBB")          # item length, context ID, message control header
ELEMENT = struct.Struct("<HHI")             # implicit VR little endian: group, element, length
UID = re.compile(rb"[0-9.]{1,64}")
A_RELEASE_RP = bytes((6, 0, 0, 0, 0, 4, 0, 0, 0, 0))


def command_fields(command: bytes) -> dict[int, bytes]:
    """Element (of group 0000) -> raw value, for a whole command set."""
    fields, offset = {}, 0
    while offset + 8 <= len(command):
        _, element, length = ELEMENT.unpack_from(command, offset)
        fields[element] = command[offset + 8:offset + 8 + length]
        offset += 8 + length
    return fields


def element(tag: int, value: bytes) -> bytes:
    if len(value) & 1:
        value += b"\x00"
    return ELEMENT.pack(0, tag, len(value)) + value


def c_store_rsp(fields: dict[int, bytes]) -> bytes:
    body = (element(0x0002, fields[0x0002].rstrip(b"\x00")) + element(0x0100, b"\x01\x80")
            + element(0x0120, fields[0x0110]) + element(0x0800, b"\x01\x01")
            + element(0x0900, b"\x00\x00") + element(0x1000, fields[0x1000].rstrip(b"\x00")))
    return element(0x0000, struct.pack("<I", len(body))) + body


class FloorProtocol(asyncio.Protocol):
    def __init__(self, directory: str, flush: bool):
        self.directory = directory
        self.flush = flush
        self.buffer = bytearray()
        self.command = bytearray()
        self.fields: dict[int, bytes] = {}
        self.fragments: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= 6:
            pdu_type, length = PDU_HEADER.unpack_from(buffer)
            if len(buffer) < 6 + length:
                return
            pdu = bytes(buffer[:6 + length])
            del buffer[:6 + length]
            if pdu_type == 0x04:
                self.p_data(pdu)
            elif pdu_type == 0x01:
                self.associate(pdu)
            elif pdu_type == 0x05:
                self.transport.write(A_RELEASE_RP)
            else:
                self.transport.close()
                return

    def associate(self, pdu: bytes) -> None:
        request = A_ASSOCIATE_RQ.decode(memoryview(pdu))
        items = [ApplicationContextItem("1.2.840.10008.3.1.1.1")]
        items += [PresentationContextItemAC(context.context_id, 0, context.transfer_syntaxes[0])
                  for context in request.presentation_contexts]
        items.append(UserInformationItem((MaximumLengthSubItem(0),
                                          ImplementationClassUIDSubItem(IMPLEMENTATION_CLASS_UID))))
        self.transport.write(A_ASSOCIATE_AC(request.called_ae_title, request.calling_ae_title,
                                            tuple(items)).encode())

    def p_data(self, pdu: bytes) -> None:
        offset = 6
        while offset < len(pdu):
            length, context_id, control = PDV_HEADER.unpack_from(pdu, offset)
            fragment = pdu[offset + 6:offset + 4 + length]
            offset += 4 + length
            if control & 1:                         # command
                self.command += fragment
                if control & 2:
                    self.fields = command_fields(bytes(self.command))
                    self.command = bytearray()
            else:
                self.fragments.append(fragment)
                if control & 2:
                    self.store(context_id)

    def store(self, context_id: int) -> None:
        uid = self.fields[0x1000].rstrip(b"\x00 ")
        name = uid.decode() if UID.fullmatch(uid) else uid.hex()[:128]
        fd = os.open(os.path.join(self.directory, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     0o644)
        try:
            os.writev(fd, self.fragments)
            if self.flush:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.fragments = []
        response = c_store_rsp(self.fields)
        self.transport.write(struct.pack(">BxIIBB", 4, len(response) + 6, len(response) + 2,
                                         context_id, 3) + response)


async def serve(port: int, directory: str, flush: bool) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FloorProtocol(directory, flush), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--fsync", action="store_true", help="flush each file before answering")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    try:
        uvloop.run(serve(args.port, args.dir, args.fsync))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
