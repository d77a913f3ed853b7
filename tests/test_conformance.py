"""The generated conformance statement: checked in, true to negotiation, no orphan numbers.

- ``conformance/CONFORMANCE.md`` is exactly ``dicomagent conformance-statement``;
- the SOP classes, roles and transfer syntaxes of the JSON statement are the
  acceptor's negotiation table, and a running daemon accepts exactly those
  (and rejects a SOP class it does not list);
- every status code of the statement is a constant of the module whose
  handler returns it;
- every SOP class of the seed's Tables 2-10 is in the statement.

References
----------
PS3.2; PS3.8 §9.3.3.2 (presentation context results); seed Tables 2-10.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
from pathlib import Path

import pytest

from dicomagent import conformance
from dicomagent.association import associate
from dicomagent.config import Config
from dicomagent.services import acceptor_abstract_syntaxes, registry
from dicomagent.ul.negotiation import ProposedContext
from dicomagent.uids import UNCOMPRESSED_TRANSFER_SYNTAXES
from nodes import dicomagent_cmd, run

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / "conformance" / "CONFORMANCE.md"
#: Tables 2-10 of the seed statement (the "DICOM Agent" conformance statement this project
#: implements), copied verbatim from its section 2.2: the SOP classes it promises.
SEED = ROOT / "tests" / "data" / "seed-tables-2-10.txt"
#: Basic Grayscale Print Management Meta: the agent proposes it, never accepts it.
NOT_ACCEPTED = "1.2.840.10008.5.1.1.9"


@pytest.fixture(scope="module")
def data() -> dict:
    """The JSON statement, as the command prints it."""
    result = run(dicomagent_cmd("conformance-statement", "--format", "json"))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def accepted_by_statement(data: dict) -> dict[str, dict]:
    """SOP class UID -> {"roles", "transfer_syntaxes"} of the statement's acceptor tables."""
    table = {}
    for service in data["services"]:
        if service["acceptor"]:
            for sop in service["sop_classes"]:
                table[sop["uid"]] = service["acceptor"]
    return table


def test_checked_in_statement_is_current():
    result = run(dicomagent_cmd("conformance-statement"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == conformance.markdown(conformance.statement())
    assert CHECKED_IN.exists() and CHECKED_IN.read_text() == result.stdout, (
        "conformance/CONFORMANCE.md is out of date; regenerate it with\n"
        "    python -m dicomagent conformance-statement > conformance/CONFORMANCE.md")


def test_statement_is_the_negotiation_table(data):
    config = Config()
    negotiation = acceptor_abstract_syntaxes(registry(config))
    statement = accepted_by_statement(data)
    assert set(statement) == set(negotiation)
    for uid, support in negotiation.items():
        roles = {"SCP"} if support.scp else set()
        roles |= {"SCU"} if support.scu else set()
        assert set(statement[uid]["roles"]) == roles, uid
        expected = support.transfer_syntaxes or tuple(config.agent.transfer_syntax_order)
        assert set(statement[uid]["transfer_syntaxes"]) == set(expected), uid
    assert NOT_ACCEPTED not in negotiation


def test_running_daemon_accepts_what_the_statement_lists(data, agent_factory):
    statement = accepted_by_statement(data)
    agent = agent_factory()
    proposed = sorted(statement) + [NOT_ACCEPTED]

    async def propose() -> dict[str, str]:
        association = await associate(agent.host, agent.port, "CONFTEST", agent.ae_title,
                                      [ProposedContext(uid, UNCOMPRESSED_TRANSFER_SYNTAXES)
                                       for uid in proposed])
        try:
            return {context.abstract_syntax: context.transfer_syntax
                    for context in association.contexts.values()}
        finally:
            await association.release()

    accepted = asyncio.run(propose())
    assert set(accepted) == set(statement)
    assert NOT_ACCEPTED not in accepted
    for uid, transfer_syntax in accepted.items():
        # The statement's order is the selection policy: its first one is chosen.
        assert transfer_syntax == statement[uid]["transfer_syntaxes"][0], uid


def test_dcmtk_echoscu_and_findscu_against_the_statement(data, agent_factory):
    statement = accepted_by_statement(data)
    assert "1.2.840.10008.1.1" in statement and "1.2.840.10008.5.1.4.1.2.2.1" in statement
    agent = agent_factory()
    echo = run(["echoscu", "-aec", agent.ae_title, agent.host, str(agent.port)])
    assert echo.returncode == 0, echo.stderr
    find = run(["findscu", "-S", "-aec", agent.ae_title, "-k", "QueryRetrieveLevel=STUDY",
                "-k", "StudyInstanceUID", agent.host, str(agent.port)])
    assert find.returncode == 0, find.stderr + find.stdout


def test_every_status_code_is_a_constant_of_its_module(data):
    tables = [(table["module"], table["codes"]) for service in data["services"]
              for table in service["statuses"]]
    tables.append((data["general_statuses_module"], data["general_statuses"]))
    assert tables
    for module_name, codes in tables:
        assert module_name, "a status table without the handler that returns it"
        module = importlib.import_module(module_name)
        constants = {value for name, value in vars(module).items()
                     if name.isupper() and isinstance(value, int)}
        for code in codes:
            assert int(code["code"], 16) in constants, (
                f"status {code['code']} of the statement is no constant of {module_name}")


def seed_table_uids(text: str, numbers: range) -> dict[int, set[str]]:
    """UIDs of the seed's "Table N:" SOP class tables (a table may be split over pages)."""
    found: dict[int, set[str]] = {n: set() for n in numbers}
    current = None
    for line in text.splitlines():
        heading = re.match(r"\**Table (\d+):", line.strip())
        if heading:
            current = int(heading.group(1))
            continue
        if re.match(r"\d+(\.\d+)*\. ", line) or line.startswith("DICOM Agent provides"):
            current = None
            continue
        uid = re.search(r"\t(1\.2\.840\.10008(?:\.\d+)+)\s*$", line)
        if uid and current in found:
            found[current].add(uid.group(1))
    return found


def test_every_seed_sop_class_is_in_the_statement(data):
    if not SEED.exists():
        pytest.fail(f"the seed statement is not at {SEED}", pytrace=False)
    tables = seed_table_uids(SEED.read_text(encoding="utf-8", errors="replace"), range(2, 11))
    listed = {sop["uid"] for service in data["services"] for sop in service["sop_classes"]}
    for number, uids in tables.items():
        assert uids, f"no UID found in seed Table {number}"
        missing = uids - listed
        assert not missing, f"seed Table {number}: {sorted(missing)} not in the statement"
