"""PS3.4 Annex A: Verification Service Class, SCP and SCU.

The SCP answers every C-ECHO-RQ with a C-ECHO-RSP of status Success (seed
Table 37: 0000). The SCU side is ``echo`` below, used by ``dicomagent echo``.

References
----------
PS3.4 Annex A; PS3.7 §9.1.5 (C-ECHO), §9.3.5 (C-ECHO-RQ / -RSP).
"""

from __future__ import annotations

import logging

from dicomagent.dimse.commands import C_ECHO_RQ, C_ECHO_RSP
from dicomagent.dimse.status import SUCCESS
from dicomagent.services import Initiation, ServiceClass, Status
from dicomagent.uids import VERIFICATION

log = logging.getLogger("dicomagent.verification")


def handle_c_echo(association, context, received) -> None:
    """PS3.4 A.4: answer C-ECHO-RQ with Success."""
    request = received.command
    association.send_message(context.context_id, C_ECHO_RSP(
        AffectedSOPClassUID=request.AffectedSOPClassUID or context.abstract_syntax,
        MessageIDBeingRespondedTo=request.MessageID,
        Status=SUCCESS))
    log.info("%s C-ECHO: success", association.describe())


async def echo(association) -> int:
    """PS3.4 A.3: send one C-ECHO-RQ on the Verification context; return the Status."""
    context = association.context_for(VERIFICATION)
    response = await association.request(context.context_id, C_ECHO_RQ(
        AffectedSOPClassUID=VERIFICATION, MessageID=association.next_message_id()))
    return response.command.Status


SERVICE = ServiceClass(
    name="Verification",
    reference="PS3.4 Annex A",
    sop_classes={VERIFICATION: "Verification SOP Class"},
    scp=True,
    scu=True,
    handlers={C_ECHO_RQ: handle_c_echo},
    statuses={C_ECHO_RQ: (Status(SUCCESS, "Operation performed properly"),)},
    initiates=(Initiation("SCU", "echo", "verify that a DICOM node answers (C-ECHO-RQ)"),),
)
