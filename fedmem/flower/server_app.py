"""Flower ServerApp: the round loop. Send the memory, collect updates, aggregate, save.

All the math lives in ``fedmem.federation`` / ``fedmem.aggregate``; this module only
moves messages, keeps the files (one checkpoint per round, metrics.jsonl, the final
memory) and reports progress.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedmem.answer import Question, Scores, score
from fedmem.base_model import load_model, load_tokenizer
from fedmem.config import FederationConfig, ServerSettings
from fedmem.federation import base_fingerprint, run_round, set_threads
from fedmem.log import progress
from fedmem.lora import merge_factors
from fedmem.memory import MemoryFormatError, atomic_write_text, load_memory, save_memory

from .messages import (
    CONFIG_KEY,
    INFO_KEY,
    MANIFEST_KEY,
    MEMORY_KEY,
    METRICS_KEY,
    UPDATE_KEY,
    config_to_record,
    factors_to_record,
    record_to_factors,
)

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    base_dir: str  # the coordinator's own copy of the base model: for fingerprints and evaluation
    out_dir: Path
    federation: FederationConfig
    server: ServerSettings = field(default_factory=ServerSettings)
    questions: list[Question] | None = None
    device: str = "cpu"  # the coordinator's, for evaluation; owners pick their own
    # Deployment: send every new memory version to the clients so they can use it locally.
    publish: bool = False

    @property
    def round_timeout(self) -> float | None:
        return self.server.round_timeout or None


def evaluate(base_dir: str, factors, questions: list[Question], device: str) -> Scores:
    model = load_model(base_dir, device)
    if factors:
        merge_factors(model, factors)
    return score(model, load_tokenizer(base_dir), questions)


def _wait_for_nodes(grid: Grid, plan: RunPlan) -> list[int]:
    deadline = time.monotonic() + plan.server.wait_for_clients
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= plan.server.min_clients:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {plan.server.min_clients} clients connected")
        time.sleep(1.0)
    # Owners who join together should train together: once the minimum is there, go on
    # only when nobody new has connected for join_grace seconds.
    settled = time.monotonic()
    while time.monotonic() - settled < plan.server.join_grace:
        time.sleep(1.0)
        now = list(grid.get_node_ids())
        if set(now) - set(nodes):
            settled = time.monotonic()
        nodes = now
    return nodes


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


def _comparable(federation: dict) -> dict:
    # More rounds may be asked of a resumed run; anything else changes what the checkpoints mean.
    # Checkpoints from before the schedule setting were all made in parallel rounds.
    return {k: v for k, v in {"schedule": "parallel", **json.loads(json.dumps(federation))}.items() if k != "rounds"}


def last_checkpoint(plan: RunPlan, fp: str) -> tuple[int, object, dict]:
    """The newest round checkpoint that verifies: (round, factors, manifest), or (0, None, {})."""
    rounds_dir = plan.out_dir / "rounds"
    for d in sorted(rounds_dir.glob("round-[0-9][0-9][0-9]"), reverse=True):
        try:
            factors, manifest = load_memory(d, fp)
        except MemoryFormatError as err:
            # Writes are atomic, so this is damage from outside; say so and fall back one round.
            log.warning("checkpoint %s is unusable (%s); trying the one before", d.name, err)
            continue
        if _comparable(manifest.get("federation", {})) != _comparable(plan.federation.to_dict()):
            raise RuntimeError(
                f"{d}: the checkpoints in {plan.out_dir} were made with other federation settings; "
                "resume with the same settings, or use a new output directory")
        return int(manifest["round"]), factors, manifest
    return 0, None, {}


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break  # a line cut short by a crash: everything after it is gone anyway
    return rows


def _publish(grid: Grid, nodes: list[int], memory, manifest: dict, plan: RunPlan) -> None:
    """Hand the finished memory to every client still connected, best effort."""
    record = factors_to_record(memory)
    messages = [
        Message(content=RecordDict({MEMORY_KEY: record,
                                    MANIFEST_KEY: ConfigRecord({"json": json.dumps(manifest)})}),
                message_type=MessageType.EVALUATE, dst_node_id=n)
        for n in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=plan.round_timeout or 120.0))
    acknowledged = sum(1 for r in replies if not r.has_error())
    # A client that leaves as soon as it has the memory shows up here as "node unavailable".
    log.info("memory sent to %d connected clients (%d acknowledged before leaving)", len(nodes), acknowledged)


def _visit_order(grid: Grid, nodes: list[int], plan: RunPlan) -> list[int]:
    """The nodes sorted by their owners' names, so a cyclic run visits them in the same
    order every time (Flower's node ids are random); one small query message each."""
    messages = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    names: dict[int, str] = {}
    for reply in grid.send_and_receive(messages, timeout=plan.round_timeout or 120.0):
        if not reply.has_error() and INFO_KEY in reply.content:
            names[reply.metadata.src_node_id] = str(reply.content[INFO_KEY]["client"])
    return sorted(nodes, key=lambda n: (n not in names, names.get(n, ""), n))


def _usable_updates(replies: list[Message], fp: str, plan: RunPlan) -> list[tuple[dict, float, tuple[str, dict]]]:
    """(factors, size, (client name, metrics)) of each reply that can be aggregated; the rest reported."""
    usable = []
    for reply in replies:
        if reply.has_error():
            log.warning("  a client failed this round: %s", reply.error.reason)
            continue
        info = reply.content[INFO_KEY]
        if str(info["base_fingerprint"]) != fp:
            log.warning("  client %s ignored: its base model differs from the federation's", info["client"])
            continue
        factors = record_to_factors(reply.content[UPDATE_KEY])
        if not factors:
            log.warning("  client %s sent an empty update; ignored", info["client"])
            continue
        m = dict(reply.content[METRICS_KEY])
        usable.append((factors, m.get("examples", 1.0), (str(info["client"]), m)))
    return usable


def train_message(plan: RunPlan, memory, span: tuple[float, float], server_round: int, fp: str, manifest: dict,
                  node: int) -> Message:
    """What one owner is sent to train: the memory, the recipe and its slice of the schedule.
    Only the recipe travels: each owner's device, base-model path and threads are its own."""
    sent = {"federation": plan.federation.to_dict(), "span": list(span)}
    content = {MEMORY_KEY: factors_to_record(memory), CONFIG_KEY: config_to_record(sent, server_round, fp)}
    if plan.publish and manifest:
        content[MANIFEST_KEY] = ConfigRecord({"json": json.dumps(manifest)})
    return Message(content=RecordDict(content), message_type=MessageType.TRAIN, dst_node_id=node)


def _recall_text(accuracy: float, by_source: dict[str, float]) -> str:
    return f"{accuracy:.0%} " + " ".join(f"{k} {v:.0%}" for k, v in by_source.items())


def run_rounds(grid: Grid, plan: RunPlan) -> dict:
    set_threads()
    cfg = plan.federation
    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    fp = base_fingerprint(plan.base_dir)
    summary: dict = {"rounds": []}
    done, memory, manifest = last_checkpoint(plan, fp) if plan.server.resume else (0, None, {})
    clients_seen: set[str] = set(manifest.get("clients", []))
    if done:
        kept = [r for r in read_jsonl(metrics_path) if r.get("round", 0) <= done]
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        summary["rounds"] = [r for r in kept if r.get("round", 0) > 0]
        base_row = next((r for r in kept if r.get("round") == 0), None)
        if base_row:
            summary["base_recall"] = {"accuracy": base_row["recall"], **base_row.get("recall_by_source", {})}
        log.info("resuming after round %d from %s", done, out / "rounds" / f"round-{done:03d}")
    else:
        metrics_path.unlink(missing_ok=True)

    if plan.questions and not done:
        before = evaluate(plan.base_dir, None, plan.questions, plan.device)
        summary["base_recall"] = {"accuracy": before.accuracy, **{f"{k}": v for k, v in before.by_source.items()}}
        log.info("round 0 (base model): recall %s", _recall_text(before.accuracy, before.by_source))
        _append_jsonl(metrics_path, {"round": 0, "recall": before.accuracy, "recall_by_source": before.by_source})

    for rnd in range(done + 1, cfg.rounds + 1):
        started = time.perf_counter()
        nodes = _wait_for_nodes(grid, plan)
        log.info("round %d/%d: training on %d clients%s", rnd, cfg.rounds, len(nodes),
                 " one after another ..." if cfg.schedule == "cyclic" else " ...")
        bar = progress(total=len(nodes), desc=f"round {rnd}/{cfg.rounds}", unit="owner")

        def train(targets: list[int], memory, span: tuple[float, float]) -> list[tuple]:
            messages = [train_message(plan, memory, span, rnd, fp, manifest, n) for n in targets]
            usable = _usable_updates(list(grid.send_and_receive(messages, timeout=plan.round_timeout)), fp, plan)
            if cfg.schedule == "cyclic":
                for _, _, (name, m) in usable:
                    log.info("  %s trained: loss %.2f->%.3f", name, m["first_loss"], m["final_loss"])
            bar.update(len(targets))
            return usable

        # Cyclic: one owner at a time, in the order of their names, each on the memory the one before left.
        owners = _visit_order(grid, nodes, plan) if cfg.schedule == "cyclic" else nodes
        agg, trained = run_round(cfg, rnd, owners, memory, train)
        bar.close()
        names = [name for name, _ in trained]
        client_metrics = dict(trained)
        if agg is None or len(names) < plan.server.min_clients:
            raise RuntimeError(f"round {rnd}: only {len(names)} usable updates, {plan.server.min_clients} required")
        memory = agg.factors
        clients_seen.update(names)
        record = {
            "round": rnd,
            "clients": sorted(names),
            "client_metrics": client_metrics,
            "truncation_error": agg.max_truncation_error,
        }
        if cfg.schedule == "cyclic":
            record["visit_order"] = names
        line = f"round {rnd}/{cfg.rounds}: {len(names)} clients, loss " + ", ".join(
            f"{n} {client_metrics[n]['first_loss']:.2f}->{client_metrics[n]['final_loss']:.3f}" for n in sorted(names)
        )
        if cfg.method == "exact":
            line += f", truncation error {agg.max_truncation_error:.2e}"
        if plan.questions:
            after = evaluate(plan.base_dir, memory, plan.questions, plan.device)
            record.update(recall=after.accuracy, recall_by_source=after.by_source)
            line += f", recall {_recall_text(after.accuracy, after.by_source)}"
        record["seconds"] = time.perf_counter() - started
        manifest = {
            "base_model": plan.base_dir,
            "base_fingerprint": fp,
            "round": rnd,
            "rounds": cfg.rounds,
            "clients": sorted(clients_seen),
            "aggregation": {"method": cfg.method, "schedule": cfg.schedule, "rank": cfg.lora.rank},
            "federation": cfg.to_dict(),
            "metrics": {k: v for k, v in record.items() if k not in ("client_metrics",)},
        }
        # Metrics first: a crash between the two leaves a row without a checkpoint, which a
        # resumed run drops, never a checkpoint without its row.
        _append_jsonl(metrics_path, record)
        save_memory(out / "rounds" / f"round-{rnd:03d}", memory, Path(plan.base_dir), manifest)
        log.info("%s (%.0fs)", line, record["seconds"])
        summary["rounds"].append(record)
    if memory is None:
        raise RuntimeError("no round was completed, so there is no memory to save")
    save_memory(out / "memory", memory, Path(plan.base_dir), manifest)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    if plan.publish:
        _publish(grid, list(grid.get_node_ids()), memory, manifest, plan)
    return summary


def make_server_app(plan: RunPlan) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_rounds(grid, plan)

    return app
