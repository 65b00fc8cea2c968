"""Flower ServerApp: the round loop. Send the memory, collect updates, aggregate, save.

All the math lives in ``fedmem.federation`` / ``fedmem.aggregate``; this module only
moves messages, keeps the files (one checkpoint per round, metrics.jsonl, the final
memory) and reports progress.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedmem.answer import Question, Scores, score
from fedmem.base_model import load_model, load_tokenizer, quiet_libraries
from fedmem.federation import FederationConfig, base_fingerprint, server_aggregate, set_threads
from fedmem.lora import merge_factors
from fedmem.memory import atomic_write_text, save_memory
from fedmem.messages import (CONFIG_KEY, INFO_KEY, MEMORY_KEY, METRICS_KEY, UPDATE_KEY, config_to_record,
                             factors_to_record, record_to_factors)


@dataclass
class RunPlan:
    base_dir: str
    out_dir: Path
    federation: FederationConfig
    min_clients: int = 1
    questions: list[Question] | None = None
    device: str = "cpu"
    round_timeout: float | None = None
    wait_for_clients: float = 300.0
    report: Callable[[str], None] = field(default=print)


def evaluate(base_dir: str, factors, questions: list[Question], device: str) -> Scores:
    model = load_model(base_dir, device)
    if factors:
        merge_factors(model, factors)
    return score(model, load_tokenizer(base_dir), questions)


def _wait_for_nodes(grid: Grid, plan: RunPlan) -> list[int]:
    deadline = time.monotonic() + plan.wait_for_clients
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= plan.min_clients:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {plan.min_clients} clients connected")
        time.sleep(1.0)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


def run_rounds(grid: Grid, plan: RunPlan) -> dict:
    quiet_libraries()
    set_threads()
    cfg = plan.federation
    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    fp = base_fingerprint(plan.base_dir)
    run_config = {"base_dir": plan.base_dir, "device": plan.device, "federation": cfg.to_dict()}
    summary: dict = {"rounds": []}

    if plan.questions:
        before = evaluate(plan.base_dir, None, plan.questions, plan.device)
        summary["base_recall"] = {"accuracy": before.accuracy, **{f"{k}": v for k, v in before.by_source.items()}}
        plan.report(f"round 0 (base model): recall {before.accuracy:.0%} "
                    + " ".join(f"{k} {v:.0%}" for k, v in before.by_source.items()))
        _append_jsonl(metrics_path, {"round": 0, "recall": before.accuracy, "recall_by_source": before.by_source})

    memory = None
    clients_seen: set[str] = set()
    for rnd in range(1, cfg.rounds + 1):
        started = time.perf_counter()
        nodes = _wait_for_nodes(grid, plan)
        plan.report(f"round {rnd}/{cfg.rounds}: training on {len(nodes)} clients ...")
        memory_record = factors_to_record(memory)
        messages = [
            Message(content=RecordDict({MEMORY_KEY: memory_record, CONFIG_KEY: config_to_record(run_config, rnd, fp)}),
                    message_type=MessageType.TRAIN, dst_node_id=n)
            for n in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=plan.round_timeout))
        updates, sizes, names, client_metrics = [], [], [], {}
        for reply in replies:
            if reply.has_error():
                plan.report(f"  a client failed this round: {reply.error.reason}")
                continue
            info = reply.content[INFO_KEY]
            if str(info["base_fingerprint"]) != fp:
                plan.report(f"  client {info['client']} ignored: its base model differs from the federation's")
                continue
            factors = record_to_factors(reply.content[UPDATE_KEY])
            if not factors:
                plan.report(f"  client {info['client']} sent an empty update; ignored")
                continue
            m = dict(reply.content[METRICS_KEY])
            updates.append(factors)
            sizes.append(m.get("examples", 1.0))
            names.append(str(info["client"]))
            client_metrics[str(info["client"])] = m
        if len(updates) < plan.min_clients:
            raise RuntimeError(f"round {rnd}: only {len(updates)} usable updates, {plan.min_clients} required")
        agg = server_aggregate(memory, updates, sizes, cfg)
        memory = agg.factors
        clients_seen.update(names)
        record = {
            "round": rnd,
            "clients": sorted(names),
            "client_metrics": client_metrics,
            "truncation_error": agg.max_truncation_error,
        }
        line = f"round {rnd}/{cfg.rounds}: {len(names)} clients, loss " + ", ".join(
            f"{n} {client_metrics[n]['first_loss']:.2f}->{client_metrics[n]['final_loss']:.3f}" for n in sorted(names)
        )
        if cfg.method == "exact":
            line += f", truncation error {agg.max_truncation_error:.2e}"
        if plan.questions:
            after = evaluate(plan.base_dir, memory, plan.questions, plan.device)
            record.update(recall=after.accuracy, recall_by_source=after.by_source)
            line += f", recall {after.accuracy:.0%} " + " ".join(f"{k} {v:.0%}" for k, v in after.by_source.items())
        record["seconds"] = time.perf_counter() - started
        manifest = {
            "base_model": plan.base_dir,
            "base_fingerprint": fp,
            "round": rnd,
            "rounds": cfg.rounds,
            "clients": sorted(clients_seen),
            "aggregation": {"method": cfg.method, "weighting": cfg.weighting, "memory_rank": cfg.memory_rank},
            "federation": cfg.to_dict(),
            "metrics": {k: v for k, v in record.items() if k not in ("client_metrics",)},
        }
        save_memory(out / "rounds" / f"round-{rnd:03d}", memory, Path(plan.base_dir), manifest)
        _append_jsonl(metrics_path, record)
        plan.report(line + f" ({record['seconds']:.0f}s)")
        summary["rounds"].append(record)
    save_memory(out / "memory", memory, Path(plan.base_dir), manifest)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def make_server_app(plan: RunPlan) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_rounds(grid, plan)

    return app
