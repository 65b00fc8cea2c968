"""``fedmem simulate``: the whole federation on one machine, on Flower's Simulation Engine.

One virtual client (a Ray actor) per subdirectory of ``data``. Every corpus is
validated before anything starts, so a bad file fails fast with its name and line.
"""

from __future__ import annotations

import json
import logging
import os
from importlib.resources import files
from pathlib import Path

from .answer import load_questions
from .base_model import pick_device, resolve_base
from .corpus import CorpusError, load_corpus
from .federation import FederationConfig


def demo_dir() -> Path:
    return Path(str(files("fedmem.demo")))


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
    base: str | None = None,
    questions: Path | None = None,
    device: str = "auto",
    report=print,
) -> dict:
    from flwr.simulation import run_simulation

    from .clients.client_app import make_client_app
    from .server.server_app import RunPlan, make_server_app

    if data is None:
        data = demo_dir() / "corpora"
        questions = questions or demo_dir() / "questions.jsonl"
    dirs = client_dirs(Path(data))
    validate_corpora(dirs)
    qs = load_questions(questions) if questions else None
    base_dir = str(resolve_base(base))
    device = pick_device(device)
    report(f"fedmem simulate: {len(dirs)} clients ({', '.join(d.name for d in dirs)}), "
           f"{federation.rounds} {federation.schedule} rounds, method {federation.method}, base {base_dir}, device {device}")

    plan = RunPlan(base_dir=base_dir, out_dir=Path(out), federation=federation, min_clients=len(dirs),
                   questions=qs, device=device, report=report)
    cpus = os.cpu_count() or 1
    # One client at a time with every core: on a small machine, clients training side by
    # side only fight over the same cores (and each holds a model copy in memory).
    backend_config = {
        "client_resources": {"num_cpus": cpus, "num_gpus": 1.0 if device == "cuda" else 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": logging.ERROR,
                      "log_to_driver": True},
    }
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(
        server_app=make_server_app(plan),
        client_app=make_client_app([str(d) for d in dirs], base_dir),
        num_supernodes=len(dirs),
        backend_config=backend_config,
    )
    summary_file = Path(out) / "summary.json"
    if not summary_file.is_file():
        raise RuntimeError("the simulation ended without producing a memory; see the log above")
    return json.loads(summary_file.read_text())
