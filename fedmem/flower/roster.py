"""Who is behind each node: the coordinator's own names for the owners, never ones a client chose.

Deployed, the name and key fingerprint the coordinator admitted (``fedmem-server clients
add``), looked up by the node id Flower authenticated the reply with; in simulation, where
one machine runs every owner and there are no keys, the name each node's ClientApp gives
when asked (its corpus directory, which the simulation assigned to that partition).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedmem.validate import display_name

from .messages import INFO_KEY

if TYPE_CHECKING:  # the round loop's plan; importing it here would be circular
    from .server_app import RunPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Owner:
    name: str  # the coordinator's name for this owner (deployed: the admitted name)
    key: str | None = None  # the admitted key's fingerprint; None where names are not bound to keys

    @property
    def shown(self) -> str:
        return self.name + (f" (key {self.key})" if self.key else "")


def admitted_owners(allow_list: Path) -> dict[int, Owner]:
    """node id -> the owner admitted with that node's key, from the coordinator's allow-list."""
    from fedmem.server import admission

    clients = admission.read_allow_list(allow_list)["clients"]
    return {node: Owner(name, key) for node, (name, key) in admission.owners_by_node(clients).items()}


class Roster:
    """Who is behind each connected node, asked again every round.

    Deployed (``plan.allow_list``): the allow-list, read afresh (owners are added while the
    server runs); a node that is not on it (a node registered some other way) is refused:
    it does not count towards min-clients and is sent nothing. Otherwise each node is asked
    its name (one small query message); a name two nodes give is refused for both.
    """

    def __init__(self, grid: Grid, plan: RunPlan):
        self.grid, self.plan = grid, plan
        self.warned: set[int] = set()

    def admitted(self, nodes) -> list[int]:
        nodes = list(nodes)
        if self.plan.allow_list is None:
            return nodes
        table = admitted_owners(self.plan.allow_list)
        for n in nodes:
            if n not in table and n not in self.warned:
                self.warned.add(n)
                log.warning("node %s is connected but not on the allow-list: refused, it is sent nothing", n)
        return [n for n in nodes if n in table]

    def identify(self, nodes: list[int]) -> tuple[dict[int, Owner], list[dict]]:
        """(node -> owner for every node that has one, [{"node", "reason"}] for the others)."""
        if self.plan.allow_list is not None:
            table = admitted_owners(self.plan.allow_list)
            owners = {n: table[n] for n in nodes if n in table}
            return owners, [{"node": n, "reason": "not on the allow-list"} for n in nodes if n not in table]
        messages = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        said: dict[int, str] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.plan.round_timeout or 120.0):
            node = reply.metadata.src_node_id
            if reply.has_error() or node not in nodes:
                continue
            try:
                said[node] = display_name(reply.content[INFO_KEY]["client"])
            except (KeyError, TypeError, ValueError):
                continue
        counts: dict[str, int] = {}
        for name in said.values():
            counts[name] = counts.get(name, 0) + 1
        owners = {n: Owner(name) for n, name in said.items() if counts[name] == 1}
        refused = [{"node": n, "reason": "did not say its name" if n not in said else
                    f"gave the name {said[n]!r}, which {counts[said[n]]} nodes gave"} for n in nodes if n not in owners]
        for r in refused:
            log.warning("node %s refused: %s", r["node"], r["reason"])
        return owners, refused


def visit_order(owners: dict[int, Owner]) -> list[int]:
    """The nodes in the order of their owners' names (the coordinator's names, never ones a
    client chose), so a cyclic run visits them in the same order every time."""
    return sorted(owners, key=lambda n: (owners[n].name, n))
