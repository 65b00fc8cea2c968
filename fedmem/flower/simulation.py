"""``fedmem simulate``: the whole federation on one machine, on Flower's Simulation Engine.

One virtual client (a Ray actor) per subdirectory of ``data``. Every corpus is
validated before anything starts, so a bad file fails fast with its name and line.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from flwr.simulation import run_simulation

from fedmem.answer import load_questions
from fedmem.base_model import pick_device, resolve_base
from fedmem.config import FederationConfig, NodeSettings, ServerSettings
from fedmem.corpus import CorpusError, load_corpus
from fedmem.demo import demo_dir
from fedmem.signing import local_key_path, local_signing_key

from .client_app import VERBOSITY_ENV, make_client_app
from .server_app import RunPlan, make_server_app

log = logging.getLogger(__name__)


def client_dirs(data: Path) -> list[Path]:
    if not data.is_dir():
        raise CorpusError(data, [f"{data}: --data must be a directory with one subdirectory per client"])
    dirs = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise CorpusError(data, [f"{data}: no client subdirectories (expected one per data owner)"])
    return dirs


def validate_corpora(dirs: list[Path]) -> None:
    problems: list[str] = []
    for d in dirs:
        try:
            load_corpus(d)
        except CorpusError as err:
            problems += [f"{d.name}/{p}".replace("/.:", ":") for p in err.problems]
    if problems:
        raise CorpusError(dirs[0].parent, problems)


def simulate(
    data: Path | None,
    out: Path,
    federation: FederationConfig,
    node: NodeSettings | None = None,
    questions: Path | None = None,
    workers: int = 1,
) -> dict:
    """Run every round with one virtual owner per corpus directory; returns the run's summary.

    ``workers``: how many owners train side by side (Ray actors, each a process with its own
    copy of the base model, reused by every owner it serves); the cores, and a GPU, are split
    between them."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
    node = node or NodeSettings()
    if data is None:
        data = demo_dir() / "corpora"
        questions = questions or demo_dir() / "questions.jsonl"
    dirs = client_dirs(Path(data))
    validate_corpora(dirs)
    qs = load_questions(questions) if questions else None
    base_dir = str(resolve_base(node.base or None))
    device = pick_device(node.device)
    # A routed run merges nothing, so its aggregation method would say nothing.
    how = "each owner's LoRA kept apart" if federation.schedule == "routed" else f"method {federation.method}"
    log.info("fedmem simulate: %d clients (%s), %d %s rounds, %s, base %s, device %s", len(dirs),
             ", ".join(d.name for d in dirs), federation.rounds, federation.schedule, how, base_dir, device)

    # Everyone is on this machine: every owner gets every round (no quorum to wait for), and
    # a new run starts fresh rather than resuming whatever is in ``out``.
    server = ServerSettings(min_clients=len(dirs), round_timeout=0.0, wait_for_clients=300.0, join_grace=0.0,
                            resume=False)
    # Signed with this user's own key ($FEDMEM_HOME/keys/local-signing.key, made on first use), which
    # this user's `fedmem ask` trusts: local runs are verifiable too (docs/security.md).
    local_signing_key()
    plan = RunPlan(base_dir=base_dir, out_dir=Path(out), federation=federation, server=server, questions=qs,
                   device=device, signing_key=str(local_key_path()), threads=1 if workers > 1 else 0)
    cpus = os.cpu_count() or 1
    # By default one client at a time with every core: on a small machine, clients training side
    # by side only fight over the same cores (and each holds a model copy in memory). A small
    # model's steps are too small to keep several threads busy; workers of a thread each do
    # (100 tiny owners x 3 rounds: 266 s on one worker under load, 43 s on two; docs/aggregation.md).
    threads = node.threads
    if workers > 1:
        if workers > cpus:
            log.warning("%d workers on %d cores: they will take turns on the cores", workers, cpus)
        # Ray counts resources to 1e-4: rounded down, `workers` shares always fit in `cpus`.
        share = math.floor(cpus / workers * 10_000) / 10_000
        gpu_share = math.floor(10_000 / workers) / 10_000
        threads = threads or max(1, cpus // workers)
        log.info("%d owners train side by side, each worker on %s of %d cores with %d torch threads", workers,
                 share, cpus, threads)
    else:
        share, gpu_share = cpus, 1.0
    backend_config = {
        "client_resources": {"num_cpus": share, "num_gpus": gpu_share if device.startswith("cuda") else 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": logging.ERROR,
                      "log_to_driver": True},
    }
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray's workers inherit this process's environment: they log at the level asked for here.
    fedmem_log = logging.getLogger("fedmem")
    os.environ[VERBOSITY_ENV] = str((logging.INFO - fedmem_log.getEffectiveLevel()) // 10)
    summary_file = Path(out) / "summary.json"
    summary_file.unlink(missing_ok=True)
    run_simulation(
        server_app=make_server_app(plan),
        client_app=make_client_app([str(d) for d in dirs], NodeSettings(device=device, base=base_dir,
                                                                         threads=threads)),
        num_supernodes=len(dirs),
        backend_config=backend_config,
    )
    if not summary_file.is_file():
        raise RuntimeError("the simulation ended without producing a memory; see the log above")
    return json.loads(summary_file.read_text())
