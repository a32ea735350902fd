"""The connection state machines: every move follows the compiled table, and the derived
fields (name, closed, established) always agree with the state.

The machines are small, so every reachable state is visited (breadth-first along the table)
and every event is tried there, instead of sampling random walks that rarely leave IDLE."""

from __future__ import annotations

from collections import deque

import pytest

from palisade_c.fsm import CLIENT_STATES, EVENTS, SERVER_STATES, StateMachine, transition_table

# Written out, not derived from the names as the implementation does.
ESTABLISHED = {"C_ESTABLISHED", "C_REKEY_PENDING", "S_ESTABLISHED", "S_REKEY_PENDING"}
CLOSED = {"C_CLOSED", "S_CLOSED"}


def _machine_at(server: bool, path: list[str]) -> StateMachine:
    machine = StateMachine(server)
    for event in path:
        assert machine.fire(event)
    return machine


@pytest.mark.parametrize("server", [False, True])
def test_every_reachable_state_and_event_follows_the_table(server: bool) -> None:
    table = transition_table(server)
    states = SERVER_STATES if server else CLIENT_STATES
    paths = {states[0]: []}
    queue = deque([states[0]])
    while queue:
        state = queue.popleft()
        for event in EVENTS:
            machine = _machine_at(server, paths[state])
            assert machine.name == state == states[machine.state]
            allowed = (state, event) in table
            assert machine.can(event) == allowed
            assert machine.fire(event) == allowed
            after = table[(state, event)] if allowed else state
            assert machine.name == after == states[machine.state]
            assert machine.closed == (after in CLOSED)
            assert machine.established == (after in ESTABLISHED)
            if allowed and after not in paths:
                paths[after] = [*paths[state], event]
                queue.append(after)
    # The walk really covers the machine, including the states the derived fields are about.
    assert set(paths) == set(states)
    assert ESTABLISHED & set(paths) and CLOSED & set(paths)


def test_closed_accepts_nothing() -> None:
    for server in (False, True):
        table = transition_table(server)
        closed = "S_CLOSED" if server else "C_CLOSED"
        assert not [key for key in table if key[0] == closed]
