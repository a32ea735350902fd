"""The connection state machines: every move follows the compiled table, and the derived
fields (name, closed, established) always agree with the state."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from palisade_c.fsm import CLIENT_STATES, EVENTS, SERVER_STATES, StateMachine, transition_table


@given(server=st.booleans(), events=st.lists(st.sampled_from(EVENTS), max_size=60))
def test_random_event_sequences_follow_the_table(server: bool, events: list[str]) -> None:
    table = transition_table(server)
    states = SERVER_STATES if server else CLIENT_STATES
    machine = StateMachine(server)
    expected = states[0]
    for event in events:
        allowed = (expected, event) in table
        assert machine.can(event) == allowed
        assert machine.fire(event) == allowed
        if allowed:
            expected = table[(expected, event)]
        assert machine.name == expected == states[machine.state]
        assert machine.closed == expected.endswith("_CLOSED")
        assert machine.established == expected.endswith(("_ESTABLISHED", "_REKEY_PENDING"))


def test_closed_accepts_nothing() -> None:
    for server in (False, True):
        table = transition_table(server)
        closed = "S_CLOSED" if server else "C_CLOSED"
        assert not [key for key in table if key[0] == closed]
