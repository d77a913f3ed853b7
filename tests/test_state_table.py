"""The Upper Layer state machine follows the standard, cell by cell.

DICOM PS3.8 §9.2, Table 9-10 ("DICOM Upper Layer Protocol State Transition
Table") says, for each of the 19 events (Evt1..Evt19) arriving in each of the
13 states (Sta1..Sta13), which action to run; a blank cell means the standard
defines no transition there.  Tables 9-6 to 9-9 (§9.2.2) define each action
and the state(s) it leads to.

The table lives in ``data/ps3.8-table-9-10.csv``, typed by hand from the
standard.  This module checks that ``dicomagent.ul.fsm.TABLE_9_10``:

* holds the same action as the CSV in every one of the 19 x 13 = 247 cells
  (and nothing where the standard's cell is blank);
* uses exactly the 28 actions AE-1..AE-8, DT-1..DT-2, AR-1..AR-10, AA-1..AA-8;
* gives each action the ``next_states`` that Tables 9-6 to 9-9 document.
"""

import csv
from pathlib import Path

import pytest

from dicomagent.ul.fsm import TABLE_9_10
from dicomagent.ul.states import Event, State

CSV_PATH = Path(__file__).parent / "data" / "ps3.8-table-9-10.csv"

STATE_NAMES = [f"Sta{n}" for n in range(1, 14)]
EVENT_NAMES = [f"Evt{n}" for n in range(1, 20)]

# Every action that PS3.8 §9.2.2 defines, in the order the standard lists them.
ACTION_NAMES = (
    [f"AE-{n}" for n in range(1, 9)]  # Table 9-6, association establishment
    + [f"DT-{n}" for n in range(1, 3)]  # Table 9-7, data transfer
    + [f"AR-{n}" for n in range(1, 11)]  # Table 9-8, association release
    + [f"AA-{n}" for n in range(1, 9)]  # Table 9-9, association abort
)

# "Next state is ..." for each action, as Tables 9-6 to 9-9 print it.
# Two actions can end in either of two states:
#   AE-6: Sta3 if the A-ASSOCIATE-RQ is acceptable to the service provider,
#         otherwise it sends an A-ASSOCIATE-RJ PDU and goes to Sta13.
#   AR-8: release collision; Sta9 on the association-requestor, else Sta10.
DOCUMENTED_NEXT_STATES = {
    # Table 9-6. Association establishment related actions
    "AE-1": {"Sta4"},
    "AE-2": {"Sta5"},
    "AE-3": {"Sta6"},
    "AE-4": {"Sta1"},
    "AE-5": {"Sta2"},
    "AE-6": {"Sta3", "Sta13"},
    "AE-7": {"Sta6"},
    "AE-8": {"Sta13"},  # printed "STA13" in the standard
    # Table 9-7. Data transfer related actions
    "DT-1": {"Sta6"},
    "DT-2": {"Sta6"},
    # Table 9-8. Association release related actions
    "AR-1": {"Sta7"},
    "AR-2": {"Sta8"},
    "AR-3": {"Sta1"},
    "AR-4": {"Sta13"},
    "AR-5": {"Sta1"},
    "AR-6": {"Sta7"},
    "AR-7": {"Sta8"},
    "AR-8": {"Sta9", "Sta10"},
    "AR-9": {"Sta11"},
    "AR-10": {"Sta12"},
    # Table 9-9. Association abort related actions
    "AA-1": {"Sta13"},
    "AA-2": {"Sta1"},
    "AA-3": {"Sta1"},
    "AA-4": {"Sta1"},
    "AA-5": {"Sta1"},
    "AA-6": {"Sta13"},
    "AA-7": {"Sta13"},
    "AA-8": {"Sta13"},
}


def load_standard_table():
    """Return the CSV as {"EvtN": {"StaM": "AE-1" or "", ...}, ...}."""
    with CSV_PATH.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["event", *STATE_NAMES], "unexpected CSV header"
        table = {}
        for row in reader:
            event = row.pop("event")
            assert None not in row, f"{event}: too many cells in CSV row"
            assert None not in row.values(), f"{event}: too few cells in CSV row"
            table[event] = {state: cell.strip() for state, cell in row.items()}
    assert list(table) == EVENT_NAMES, "CSV rows must be Evt1..Evt19, in order"
    return table


STANDARD = load_standard_table()

CELLS = [(event, state) for event in EVENT_NAMES for state in STATE_NAMES]


def implemented_actions():
    """Return {action name: action} for every action used in TABLE_9_10."""
    by_name = {}
    for row in TABLE_9_10.values():
        for action in row.values():
            other = by_name.setdefault(action.name, action)
            assert other is action, f"two different functions are named {action.name}"
    return by_name


# --- The CSV itself ---------------------------------------------------------


def test_csv_uses_exactly_the_standard_actions():
    used = {cell for row in STANDARD.values() for cell in row.values() if cell}
    assert used == set(ACTION_NAMES)


# --- The enums ----------------------------------------------------------------


def test_states_are_sta1_to_sta13():
    assert [s.name for s in State] == STATE_NAMES


def test_events_are_evt1_to_evt19():
    assert [e.name for e in Event] == EVENT_NAMES


# --- TABLE_9_10 against the standard ---------------------------------------------


def test_table_is_keyed_by_event_and_state_members():
    for event, row in TABLE_9_10.items():
        assert isinstance(event, Event), f"outer key {event!r} is not an Event"
        for state in row:
            assert isinstance(state, State), f"{event.name}: key {state!r} is not a State"


@pytest.mark.parametrize(
    "event_name, state_name", CELLS, ids=[f"{e}-{s}" for e, s in CELLS]
)
def test_cell_matches_standard(event_name, state_name):
    expected = STANDARD[event_name][state_name]  # "" where the standard is blank
    action = TABLE_9_10.get(Event[event_name], {}).get(State[state_name])
    actual = "" if action is None else action.name
    assert actual == expected, (
        f"{event_name} in {state_name}: standard says {expected or 'blank'}, "
        f"TABLE_9_10 has {actual or 'nothing'}"
    )


def test_table_uses_exactly_the_standard_actions():
    assert set(implemented_actions()) == set(ACTION_NAMES)


@pytest.mark.parametrize("action_name", ACTION_NAMES)
def test_next_states_match_standard(action_name):
    action = implemented_actions().get(action_name)
    assert action is not None, f"{action_name} is not used anywhere in TABLE_9_10"
    expected = frozenset(State[name] for name in DOCUMENTED_NEXT_STATES[action_name])
    assert action.next_states == expected
