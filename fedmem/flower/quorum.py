"""When a round stops waiting: every owner asked has replied, a quorum has, or the deadline passed.

Flower's ``Grid.send_and_receive`` waits for every reply or the timeout. A parallel round
with many owners should not wait for its slowest one, so the round closes as soon as the
quorum's replies are in. A reply that comes after its round closed is never read: it was
trained on a memory the coordinator has replaced, and folding it into the next round would
add a change measured against the wrong memory. Its owner is counted as late (logged, in
the metrics) and gets the next round's memory like everyone else.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

# How often to ask for replies: as often as Flower's own send_and_receive does on each grid (the
# in-memory grid of a simulation says; the deployed one polls every 3 s). Polling a deployed
# SuperLink faster makes its SQLite state refuse the owners' own pushes ("database is locked")
# once eight or more owners reply together.
DEPLOYED_POLL_SECONDS = 3.0
PULL_RETRIES = 10  # consecutive failed pulls a round rides out

log = logging.getLogger(__name__)


def needed(quorum: float, asked: int) -> int:
    """Replies that close a round of ``asked`` owners: the quorum's share, rounded up, at least one."""
    if not 0 < quorum <= 1:
        raise ValueError(f"quorum must be a share in (0, 1], got {quorum!r}")
    return max(1, min(asked, math.ceil(quorum * asked - 1e-9)))


def gather(grid: Grid, messages: Iterable[Message], need: int, timeout: float | None) -> tuple[list[Message], bool]:
    """Send ``messages`` and collect replies until ``need`` have come, every one has, or ``timeout``
    seconds (None: no limit) have passed. Returns (the replies, whether the round closed with
    owners still to answer)."""
    waiting = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    failures = 0
    while waiting:
        try:
            pulled = list(grid.pull_messages(list(waiting)))
            failures = 0
        except Exception as err:  # noqa: BLE001 - whatever the grid's transport raises
            # A deployed SuperLink keeps its state in SQLite, which refuses a request now and then
            # while many owners push at once ("database is locked", HTTP 500); the replies are still
            # there at the next poll. Only a SuperLink that keeps failing ends the round.
            failures += 1
            if failures > PULL_RETRIES:
                raise
            log.warning("pulling replies failed (%s); trying again (%d of %d)", str(err)[:200], failures,
                        PULL_RETRIES)
            pulled = []
        for reply in pulled:
            waiting.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
        if not waiting or len(replies) >= need or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(getattr(grid, "pull_interval", DEPLOYED_POLL_SECONDS))
    return replies, bool(waiting)
