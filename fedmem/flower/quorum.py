"""When a round stops waiting: every owner asked has replied, a quorum has, or the deadline passed.

Flower's ``Grid.send_and_receive`` waits for every reply or the timeout. A parallel round
with many owners should not wait for its slowest one, so the round closes as soon as the
quorum's replies are in. A reply that comes after its round closed is never read: it was
trained on a memory the coordinator has replaced, and folding it into the next round would
add a change measured against the wrong memory. Its owner is counted as late (logged, in
the metrics) and gets the next round's memory like everyone else.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

POLL_SECONDS = 0.25


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
    while waiting:
        for reply in grid.pull_messages(list(waiting)):
            waiting.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
        if not waiting or len(replies) >= need or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(POLL_SECONDS)
    return replies, bool(waiting)
