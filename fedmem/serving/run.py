"""``fedmem serve`` put together: load the models, start the batcher (and the follower), run uvicorn."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from ..memory import MemoryFormatError
from .batcher import Batcher
from .engines import EngineSlot, load_base_engine, load_memory_engine
from .follow import MemoryFollower, directory_state
from .openai_api import ServeOptions, make_app

log = logging.getLogger(__name__)


@dataclass
class ServePlan:
    memory: Path | None = None  # serve this memory as it is now
    follow: Path | None = None  # or: serve this directory's newest verified version, swapping as it changes
    base: str | None = None
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    batch_wait_s: float = 0.01  # a batch gathers while requests keep coming this close together
    batch_max_wait_s: float = 0.1  # ... and no longer than this
    poll_interval_s: float = 1.0


def build(plan: ServePlan, options: ServeOptions, trust):
    """(app, batcher, follower or None): everything but the HTTP server loop, so tests can drive it."""
    from ..base_model import pick_device, resolve_base

    device = pick_device(plan.device)
    directory = plan.memory or plan.follow
    slot = EngineSlot()
    first = None
    state = directory_state(plan.follow) if plan.follow is not None else None
    if plan.memory is not None or state is not None:
        try:
            first = load_memory_engine(options.memory_name, directory, plan.base, device, trust)
        except MemoryFormatError:
            if plan.memory is not None:
                raise
            log.warning("%s: no usable memory yet; serving the base model until one is there", plan.follow,
                        exc_info=log.isEnabledFor(logging.DEBUG))
    base_dir = first.version["base_dir"] if first is not None else str(resolve_base(plan.base))
    if options.base_name is None:
        options.base_name = Path(base_dir).name
    if options.base_name == options.memory_name:
        raise ValueError(f"--base-name and --name are both {options.memory_name!r}: the two must differ")
    base = load_base_engine(options.base_name, base_dir, device)
    if first is not None:
        slot.put(first)
        log.info("memory %s (round %s) loaded from %s", first.fingerprint, first.version.get("round"), directory)
    follower = None
    if plan.follow is not None:
        # Later versions must be for the same base model: pinned to the one loaded now.
        follower = MemoryFollower(
            plan.follow, lambda d: load_memory_engine(options.memory_name, d, base_dir, device, trust), slot,
            plan.poll_interval_s)
        if first is not None:
            follower.mark_current(state)
    batcher = Batcher(plan.max_batch, plan.batch_wait_s, plan.batch_max_wait_s)
    app = make_app(batcher, base, slot, options, follower.status if follower else None)
    return app, batcher, follower


def serve(plan: ServePlan, options: ServeOptions, trust) -> None:
    """Serve until SIGINT/SIGTERM. The HTTP server runs in a thread and generation in the main
    thread: ``generate`` measured ~25% slower in any other thread than the one that loaded the
    model (2-core CPU, 16 rows: 5.1 s against 3.9 s; PyTorch's OpenMP pools are per thread).
    On a signal, uvicorn stops accepting and lets requests in flight finish (30 s at most),
    which needs the batcher to keep going until then."""
    import uvicorn

    app, batcher, follower = build(plan, options, trust)
    # log_config=None: uvicorn's loggers go through fedmem's logging setup like everything else.
    server = uvicorn.Server(uvicorn.Config(app, host=plan.host, port=plan.port, log_config=None, ws="none",
                                           timeout_graceful_shutdown=30))
    failure: list[BaseException] = []

    def http() -> None:
        try:
            server.run()  # not the main thread: uvicorn installs no signal handlers of its own
        except BaseException as err:  # noqa: BLE001 - uvicorn exits with SystemExit when it cannot bind
            failure.append(err)
        finally:
            batcher.stop()

    def shut_down(signum, frame) -> None:
        log.info("shutting down (signal %d): finishing the requests in flight", signum)
        server.should_exit = True

    previous = {sig: signal.signal(sig, shut_down) for sig in (signal.SIGINT, signal.SIGTERM)}
    if follower is not None:
        follower.start()
    thread = threading.Thread(target=http, name="fedmem-http", daemon=True)
    thread.start()
    log.info("serving %r (with the memory) and %r (without) on http://%s:%d/v1", options.memory_name,
             options.base_name, plan.host, plan.port)
    try:
        batcher.run()
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        if follower is not None:
            follower.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise ValueError(f"could not listen on {plan.host}:{plan.port} (in use, or not an address of this "
                         f"machine){': ' + repr(failure[0]) if failure else ''}")
