import socket

from loraplex.tools import processes
from loraplex.tools.processes import free_port


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range():
    """Ephemeral ports go to outgoing connections, which could take one before the child binds it."""
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    low = processes._ephemeral_low()
    assert all(processes._LOWEST_PICKED_PORT <= port < low for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))


class _Draws:
    """Stands in for the port picker's random generator: draws these ports in order."""

    def __init__(self, ports):
        self._ports = iter(ports)

    def randrange(self, start, stop):
        return next(self._ports)


def test_a_taken_port_or_one_already_handed_out_is_skipped(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(processes, "_LOWEST_PICKED_PORT", port)
        monkeypatch.setattr(processes, "_ephemeral_low", lambda: port + 1000)
        monkeypatch.setattr(processes, "_rng", _Draws([port, *range(port + 1, port + 1000)]))
        first = free_port()
        assert port < first < port + 1000
        monkeypatch.setattr(processes, "_rng", _Draws([port, first, *range(first + 1, port + 1000)]))
        assert first < free_port() < port + 1000
