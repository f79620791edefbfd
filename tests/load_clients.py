"""Socket clients that tick the 405B shape's projections as fast as they can: shared by the load
test (tests/hostile/test_load.py: correctness under load) and benchmarks/designer_load.py (the
latency figures against their targets)."""

from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import dataclass

import requests
import socketio

SOURCE = "catalog:llama-3.1-405b"
NODES = ["model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.k_proj",
         "model.layers.*.self_attn.v_proj", "model.layers.*.self_attn.o_proj"]


class Client:
    """One browser tab: a session cookie from the page, then a socket carrying it; its events are
    numbered (``seq``) as the page numbers them."""

    def __init__(self, url: str) -> None:
        self.http = requests.Session()
        assert self.http.get(url + "/", timeout=30).status_code == 200
        self.answers: list[tuple[str, dict, float]] = []
        self.arrived = threading.Condition()
        self.socket = socketio.Client(http_session=self.http)
        for name in ("design_updated", "error"):
            self.socket.on(name, lambda data, name=name: self._answer(name, data))
        self.socket.connect(url, transports=["websocket"], wait_timeout=30)
        self.wait_for(1)
        self.group = self.answers[-1][1]["groups"][0]["id"]
        self.seq = 0

    def _answer(self, name: str, data: dict) -> None:
        with self.arrived:
            self.answers.append((name, data, time.perf_counter()))
            self.arrived.notify_all()

    def wait_for(self, count: int, timeout: float = 120) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.answers) >= count, timeout), (len(self.answers), count)

    def tick(self, node: str, checked: bool) -> None:
        self.seq += 1
        self.socket.emit("toggle_nodes", {"group_id": self.group, "paths": [node], "checked": checked,
                                          "seq": self.seq})


def ticks(seed: int, count: int) -> list[tuple[str, bool]]:
    """A client's random ticks and unticks (reproducible from ``seed``)."""
    rng = random.Random(seed)
    return [(rng.choice(NODES), rng.random() < 0.5) for _ in range(count)]


def expected_nodes(sequence: list[tuple[str, bool]]) -> set[str]:
    """The nodes ticked after applying ``sequence`` in order."""
    state: dict[str, bool] = {}
    for node, checked in sequence:
        state[node] = checked
    return {node for node, checked in state.items() if checked}


@dataclass
class LoadRun:
    clients: list[Client]
    #: seconds from sending each event to its answer (only when waiting for answers)
    round_trips: list[float]

    def server_ms(self, count: int) -> list[float]:
        """``server_ms`` of every client's last ``count`` answers."""
        return [d["server_ms"] for c in self.clients for _, d, _ in c.answers[-count:]]

    def close(self) -> None:
        for client in self.clients:
            client.socket.disconnect()


def run(url: str, clients: int, count: int, pipelined: bool) -> LoadRun:
    """``clients`` clients at once, each sending ``count`` ticks: all at once (``pipelined``) or
    each after the previous answer."""
    connected = [Client(url) for _ in range(clients)]
    round_trips: list[float] = []

    def drive(index: int) -> None:
        client = connected[index]
        base = len(client.answers)
        for step, (node, checked) in enumerate(ticks(index, count)):
            sent = time.perf_counter()
            client.tick(node, checked)
            if not pipelined:
                client.wait_for(base + step + 1)
                round_trips.append(client.answers[-1][2] - sent)
        client.wait_for(base + count)

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadRun(connected, round_trips)


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]
