"""Flower ServerApp: the round loop. Send the memory, collect updates, check them, aggregate, save.

All the math lives in ``fedmem.federation`` / ``fedmem.aggregate``, every check of an
update in ``fedmem.validate``; who each reply is from is ``fedmem.flower.roster``, the
screening of replies ``fedmem.flower.screening``. This module moves messages, keeps the
files (one checkpoint per round, metrics.jsonl, the final memory) and reports progress.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedmem.aggregate import Aggregate, from_sketch, rebuilt, sketch_operators, sketch_sizes
from fedmem.answer import Question, Scores, routed_scores, score
from fedmem.base_model import load_model, load_tokenizer
from fedmem.config import FederationConfig, ServerSettings
from fedmem.federation import base_fingerprint, run_round, set_threads, training_span
from fedmem.log import progress
from fedmem.lora import merge_factors
from fedmem.memory import MemoryFormatError, atomic_write_text, fsync_path, load_memory, save_memory
from fedmem.privacy import check_budget, noise_multiplier, noise_to_signal, noisy_fold
from fedmem.routing import ROUTING, OwnerLoras, own_memory, owner_router, stacked
from fedmem.signing import SIGNATURE_FILE, Trust, load_signing_key, pack_memory
from fedmem.validate import (
    Rejected,
    check_finite,
    clean,
)

from .messages import (
    CONFIG_KEY,
    MANIFEST_KEY,
    MEMORY_KEY,
    SIGNED_MEMORY_KEY,
    config_to_record,
    factors_to_record,
    memory_files_to_record,
    message_bytes,
)
from .quorum import gather, needed
from .roster import Roster, visit_order
from .screening import Accepted, Screen, base_weight_norms, lora_targets
from .secure_round import secure_train, sketch_seed, sketch_terms
from .traffic import describe, full_model_bytes, round_traffic

log = logging.getLogger(__name__)
LOSSES_SHOWN = 8  # a round's log line names each owner's loss up to this many owners


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
    # The Ed25519 key every memory version is signed with (fedmem.signing); "" = unsigned.
    signing_key: str = ""
    # Deployment: the coordinator's allow-list (clients.json, fedmem.server.admission). Each
    # reply's node id is mapped to the name and key admitted there; a node not on it is refused
    # and sent nothing. None: owners name themselves when asked (simulation).
    allow_list: Path | None = None
    # The coordinator's torch threads (0: every core). A simulation whose owners train side by side
    # gives it one: screening's many small products otherwise wait on threads the owners hold.
    threads: int = 0

    @property
    def round_timeout(self) -> float | None:
        return self.server.round_timeout or None


def evaluate(base_dir: str, factors, questions: list[Question], device: str) -> Scores:
    """The memory's replies (no gate); a routed memory's, each question by the owner's LoRA it is routed to."""
    model = load_model(base_dir, device)
    tokenizer = load_tokenizer(base_dir)
    if isinstance(factors, OwnerLoras):
        return routed_scores(owner_router(model, tokenizer, factors), questions)[1]
    if factors:
        merge_factors(model, factors)
    return score(model, tokenizer, questions)


def _wait_for_nodes(grid: Grid, plan: RunPlan, roster: Roster) -> list[int]:
    deadline = time.monotonic() + plan.server.wait_for_clients
    while True:
        nodes = roster.admitted(grid.get_node_ids())
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
        now = roster.admitted(grid.get_node_ids())
        if set(now) - set(nodes):
            settled = time.monotonic()
        nodes = now
    return nodes


def _append_jsonl(path: Path, record: dict) -> None:
    """One row, on disk before this returns (file fsynced; its directory too when the file is new).
    A last line a crash cut short gets its end of line first, so the new row stays a line of its own."""
    created = not path.exists()
    with open(path, "ab+") as fh:
        fh.seek(0, os.SEEK_END)
        torn = False
        if fh.tell():
            fh.seek(-1, os.SEEK_END)
            torn = fh.read(1) != b"\n"
        fh.write((("\n" if torn else "") + json.dumps(record) + "\n").encode())
        fh.flush()
        os.fsync(fh.fileno())
    if created:
        fsync_path(path.parent)


def _comparable(federation: dict) -> dict:
    # More rounds may be asked of a resumed run, and another transport (the checkpoints are float32
    # whatever travelled); anything else changes what the checkpoints mean. Checkpoints from
    # before the schedule setting were all made in parallel rounds, those before secure without it.
    return {k: v for k, v in {"schedule": "parallel", "secure": False, **json.loads(json.dumps(federation))}.items()
            if k not in ("rounds", "transport")}


def last_checkpoint(plan: RunPlan, fp: str, key=None) -> tuple[int, object, dict]:
    """The newest round checkpoint that verifies: (round, factors, manifest), or (0, None, {}).
    With the run's signing ``key``, a signed checkpoint must be signed by it."""
    rounds_dir = plan.out_dir / "rounds"
    trust = None
    if key is not None:
        trust = Trust()
        trust.add(key.public_key(), "this run's signing key")
    for d in sorted(rounds_dir.glob("round-[0-9][0-9][0-9]"), reverse=True):
        try:
            factors, manifest = load_memory(d, fp, trust=trust)
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


def scan_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    """(the rows that read as JSON objects, a "file:line: problem" for every line that does not)."""
    if not path.is_file():
        return [], []
    rows, bad = [], []
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as err:
            cut = number == len(lines) and not data.endswith(b"\n")
            bad.append(f"{path}:{number}: " + ("cut short (no end of line; a crash while writing?)" if cut
                                               else f"not a JSON object ({clean(err, 120)})"))
            continue
        rows.append(row)
    return rows, bad


def read_jsonl(path: Path) -> list[dict]:
    """Every row of a metrics file; a line that does not read is reported (file:line) and
    skipped, the rows after it are kept."""
    rows, bad = scan_jsonl(path)
    for problem in bad:
        log.warning("%s; skipped", problem)
    return rows


def _resume_metrics(path: Path, done: int) -> list[dict]:
    """The metrics rows of rounds 0..done. The file is rewritten only when it holds more (rows
    of a round that left no checkpoint, lines that do not read), and only after a byte-for-byte
    copy of it is set aside, so no row is ever lost."""
    rows, bad = scan_jsonl(path)
    kept = [r for r in rows if isinstance(r.get("round"), int) and 0 <= r["round"] <= done]
    if not bad and len(kept) == len(rows):
        return kept
    aside = path.with_name(f"{path.name}.before-resume-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.copy2(path, aside)
    fsync_path(aside)
    for problem in bad:
        log.warning("%s", problem)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    fsync_path(path.parent)
    log.warning("%s: %d rows of rounds after %d (no checkpoint) and %d unreadable lines left out on resuming; "
                "the file as it was is kept as %s", path, len(rows) - len(kept), done, len(bad), aside.name)
    return kept


def signed_files(directory: Path) -> dict[str, bytes] | None:
    """A saved memory's files, byte for byte, if it is signed (what owners keep); else None."""
    return pack_memory(directory) if (directory / SIGNATURE_FILE).is_file() else None


def _publish(grid: Grid, nodes: list[int], manifest: dict, plan: RunPlan,
             files: dict[str, bytes] | None = None) -> None:
    """Hand the finished memory to every client still connected, best effort: the signed files an
    owner keeps (no factors record: nothing trains on it)."""

    def content() -> RecordDict:
        parts = {MANIFEST_KEY: ConfigRecord({"json": json.dumps(manifest)})}
        if files:
            parts[SIGNED_MEMORY_KEY] = memory_files_to_record(files)
        return RecordDict(parts)

    messages = [Message(content=content(), message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=plan.round_timeout or 120.0))
    acknowledged = sum(1 for r in replies if not r.has_error())
    # A client that leaves as soon as it has the memory shows up here as "node unavailable".
    log.info("memory sent to %d connected clients (%d acknowledged before leaving)", len(nodes), acknowledged)


def train_message(plan: RunPlan, memory, span: tuple[float, float], server_round: int, fp: str, manifest: dict,
                  node: int, files: dict[str, bytes] | None = None,
                  memory_record: ArrayRecord | None = None) -> Message:
    """What one owner is sent to train: the memory, the recipe and its slice of the schedule.
    Only the recipe travels: each owner's device, base-model path and threads are its own.
    Published runs also send the last saved memory version, signed, byte for byte (``files``),
    for the owner to keep; not with a compressed transport, whose point is the bytes: those
    owners get the signed memory at the end of the run (``_publish``). ``memory_record``: the
    memory already encoded (a round sends the same one to every owner; encode it once)."""
    sent = {"federation": plan.federation.to_dict(), "span": list(span)}
    if memory_record is None:
        memory_record = factors_to_record(memory, plan.federation.transport)
    content = {MEMORY_KEY: memory_record,
               CONFIG_KEY: config_to_record(sent, server_round, fp)}
    if plan.publish and manifest and plan.federation.transport == "fp32":
        content[MANIFEST_KEY] = ConfigRecord({"json": json.dumps(manifest)})
        if files:
            content[SIGNED_MEMORY_KEY] = memory_files_to_record(files)
    return Message(content=RecordDict(content), message_type=MessageType.TRAIN, dst_node_id=node)


def _recall_text(scores: Scores) -> str:
    """Loose recall (the answer anywhere in the reply), strict (in its first sentence), loose per source."""
    return f"{scores.accuracy:.0%} (strict {scores.strict_accuracy:.0%}) " + " ".join(
        f"{k} {v:.0%}" for k, v in scores.by_source.items())


def _recall_record(scores: Scores) -> dict:
    """The recall fields of a metrics.jsonl row: loose overall and per source, strict overall and per kind."""
    record = {"recall": scores.accuracy, "recall_by_source": scores.by_source, "recall_strict": scores.strict_accuracy}
    if scores.by_kind:
        record["recall_by_kind"] = scores.by_kind
    return record


def _loss_text(client_metrics: dict[str, dict]) -> str:
    """", loss A first->last, ..." for the round's log line; "" when owners reported none (differential privacy)."""
    losses = {n: (m["first_loss"], m["final_loss"]) for n, m in sorted(client_metrics.items())}
    if not losses:
        return ""
    if len(losses) <= LOSSES_SHOWN:
        return ", loss " + ", ".join(f"{n} {a:.2f}->{b:.3f}" for n, (a, b) in losses.items())
    # Many owners: a line per round, not a page (each owner's losses are in metrics.jsonl).
    firsts, finals = [a for a, _ in losses.values()], [b for _, b in losses.values()]
    return (f", loss mean {sum(firsts) / len(firsts):.2f}->{sum(finals) / len(finals):.3f}, "
            f"final {min(finals):.3f}..{max(finals):.3f}")


def _published_metrics(record: dict, private: bool) -> dict:
    """A round's row as the manifest (which owners and users read) carries it: no per-owner losses or counts;
    under differential privacy also no per-owner norm or weight (the weight reveals the norm's clip), which
    the noise does not cover."""
    out = {k: v for k, v in record.items() if k != "client_metrics"}
    if private:
        out["updates"] = {n: {k: u[k] for k in ("key", "node", "bytes_down", "bytes_up")}
                          for n, u in record["updates"].items()}
    return out


def _secure_round(grid: Grid, plan: RunPlan, rnd: int, owners: dict, memory, fp: str, manifest: dict,
                  files, modules: dict[str, tuple[int, int]], sent_bytes: dict, received_bytes: dict,
                  rejected: list[dict], failed: list[dict], secure_seconds: dict
                  ) -> tuple[Aggregate, list[Accepted]]:
    """A parallel round under secure aggregation (``fedmem.flower.secure_round``): owners train on the
    memory as in a plain parallel round, and the coordinator learns only the mean of their sketches of
    B·A, from which it rebuilds the memory (``fedmem.aggregate.from_sketch``): the mean of the owners'
    products at the memory's rank, what a plain round computes, exactly while K owners' rank fits the
    sketch. No update is seen alone, so none is screened: the encoding bounds each value (±BOUND) and
    the memory is checked finite. Fills the byte counts and the refused and failed owners as the plain
    round does, and each step's seconds."""
    cfg = plan.federation
    if len(owners) == 2:
        log.warning("secure aggregation with two owners: each can take its own update from the memory it "
                    "receives and is left with the other's")
    record = factors_to_record(memory, cfg.transport)
    span = training_span(cfg, rnd)
    dp = cfg.privacy
    outcome = secure_train(
        grid, list(owners),
        lambda node: train_message(plan, memory, span, rnd, fp, manifest, node, files, record).content,
        modules, cfg.lora.rank, plan.server.quorum, plan.round_timeout, private=dp.enabled)
    for node, why in outcome.failed:
        failed.append({"owner": owners[node].name, "key": owners[node].key, "node": node, "reason": why})
        log.warning("  %s failed this round: %s", owners[node].shown, why)
    for node in outcome.liars:
        rejected.append({"owner": owners[node].name, "key": owners[node].key, "node": node,
                         "reason": "revealed a wrong share in the unmask step (its update is in the sum; the "
                                   "secret was rebuilt from the other owners' shares)"})
        log.warning("  %s revealed a wrong share", owners[node].shown)
    for node in owners:
        sent_bytes[owners[node].name] = outcome.sent.get(node, 0)
    for node in outcome.survivors:
        received_bytes[owners[node].name] = outcome.received.get(node, 0)
    seed, terms = sketch_seed(outcome.session), sketch_terms(outcome.owners, dp.enabled)
    factors, errors, sums = {}, {}, {}
    for name, (d_out, d_in) in sorted(modules.items()):
        s, k = sketch_sizes(terms, cfg.lora.rank, d_out, d_in)
        _, psi = sketch_operators(name, d_out, d_in, s, k, seed)
        if dp.enabled:  # the owners' clipped changes added up: noise on the sum, as in a plain private round
            Q, core = rebuilt(outcome.mean[name], psi, d_out, s)
            sums[name] = (Q @ core) * len(outcome.survivors)
        else:
            B, A, errors[name] = from_sketch(outcome.mean[name], psi, d_out, s, cfg.lora.rank)
            factors[name] = (B.float(), A.float())
    if dp.enabled:
        z = noise_multiplier(dp.dp_epsilon, dp.dp_delta, cfg.rounds)
        noisy = noisy_fold(memory, sums, 1.0 / len(outcome.survivors), cfg.lora.rank, z * dp.dp_clip)
        factors, errors = noisy.factors, noisy.truncation_error
    trained = [Accepted(owners[n], n, {}, {}, 0.0, outcome.received.get(n, 0)) for n in outcome.survivors]
    log.info("  secure aggregation: the sum of %d owners' updates (%d dropped after the shares); steps %s",
             len(trained), len(outcome.failed), ", ".join(f"{k} {v:.1f}s" for k, v in outcome.seconds.items()))
    secure_seconds.update(outcome.seconds)
    return Aggregate(factors, errors, [1.0 / len(trained)] * len(trained)), trained


def run_rounds(grid: Grid, plan: RunPlan) -> dict:
    set_threads(plan.threads)
    cfg = plan.federation
    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    fp = base_fingerprint(plan.base_dir)
    modules = lora_targets(plan.base_dir, tuple(cfg.lora.target_modules))
    screen = Screen(fp, cfg, plan.server, modules, base_weight_norms(plan.base_dir, modules)
                    if plan.server.max_relative_update > 0 else {})
    if plan.server.clip_updates and (cfg.method != "exact" or cfg.schedule != "parallel"):
        log.warning("clip-updates applies to parallel rounds of method exact only; this run does not clip")
    signing_key = load_signing_key(plan.signing_key) if plan.signing_key else None
    full_model = full_model_bytes(plan.base_dir)
    summary: dict = {"rounds": []}
    done, memory, manifest = last_checkpoint(plan, fp, signing_key) if plan.server.resume else (0, None, {})
    files = signed_files(out / "rounds" / f"round-{done:03d}") if done and plan.publish else None
    if memory is not None and cfg.schedule == "routed":
        memory = OwnerLoras.from_manifest(memory, manifest.get(ROUTING), str(out / "rounds" / f"round-{done:03d}"))
    if memory is not None and set(stacked(memory)) != set(modules):
        raise RuntimeError(f"{out / 'rounds'}: the checkpoints cover other modules than the base model's LoRA "
                           "targets; use a new output directory")
    clients_seen: set[str] = set(manifest.get("clients", []))
    owner_keys: dict[str, str] = dict(manifest.get("owner_keys", {}))
    if done:
        kept = _resume_metrics(metrics_path, done)
        summary["rounds"] = [r for r in kept if r["round"] > 0]
        # The norm bound's reference: every update accepted so far, also before a restart.
        screen.accepted_norms = [float(u["norm"]) for r in summary["rounds"]
                                 for u in r.get("updates", {}).values() if isinstance(u, dict) and "norm" in u]
        base_row = next((r for r in kept if r.get("round") == 0), None)
        if base_row:
            summary["base_recall"] = {"accuracy": base_row["recall"], **base_row.get("recall_by_source", {})}
        log.info("resuming after round %d from %s", done, out / "rounds" / f"round-{done:03d}")
    elif plan.server.resume and metrics_path.is_file() and metrics_path.stat().st_size:
        aside = metrics_path.with_name(f"{metrics_path.name}.before-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(metrics_path, aside)
        log.warning("%s has rows but no round checkpoint verifies: starting over, the rows kept as %s",
                    metrics_path, aside.name)
    else:
        metrics_path.unlink(missing_ok=True)

    if plan.questions and not done:
        before = evaluate(plan.base_dir, None, plan.questions, plan.device)
        summary["base_recall"] = {"accuracy": before.accuracy, "strict": before.strict_accuracy,
                                  **{f"{k}": v for k, v in before.by_source.items()}}
        log.info("round 0 (base model): recall %s", _recall_text(before))
        _append_jsonl(metrics_path, {"round": 0, **_recall_record(before)})

    dp = cfg.privacy
    # What the rounds done spent (a checkpoint made under other settings, privacy included, is never resumed).
    noise_history = [float(r["privacy"]["noise_multiplier"]) for r in summary["rounds"] if "privacy" in r]
    roster = Roster(grid, plan)
    latest_saved = False
    for rnd in range(done + 1, cfg.rounds + 1):
        started = time.perf_counter()
        if dp.enabled:  # before anyone trains: a round past the budget is never run
            z = noise_multiplier(dp.dp_epsilon, dp.dp_delta, cfg.rounds)
            epsilon = check_budget(noise_history, z, dp.dp_epsilon, dp.dp_delta)
        nodes = _wait_for_nodes(grid, plan, roster)
        owners, refused_nodes = roster.identify(nodes)
        if dp.enabled and rnd == done + 1:
            ratio = noise_to_signal(z, sum(o * i for o, i in modules.values()), len(owners))
            (log.warning if ratio > 1 else log.info)(
                "differential privacy: noise multiplier %.3g for ε %g over %d rounds; each round's noise is %.3g "
                "times the most %d owners' clipped updates can add up to%s", z, dp.dp_epsilon, cfg.rounds, ratio,
                len(owners), " — with so few owners the memory will be mostly noise (docs/security.md, "
                "\"Differential privacy\")" if ratio > 1 else "")
        log.info("round %d/%d: training on %d clients%s", rnd, cfg.rounds, len(owners),
                 " one after another ..." if cfg.schedule == "cyclic" else " ...")
        bar = progress(total=len(owners), desc=f"round {rnd}/{cfg.rounds}", unit="owner")
        rejected: list[dict] = []
        failed: list[dict] = []
        sent_bytes: dict[str, int] = {}  # owner -> bytes of the train message it was sent
        received_bytes: dict[str, int] = {}  # owner -> bytes of its reply, if it was read

        def train(targets: list[int], memory, span: tuple[float, float]) -> list[tuple]:
            # Routed: each owner is sent its own LoRA (none in its first round), so each message is its own.
            routed = isinstance(memory, OwnerLoras)
            record = None if routed else factors_to_record(memory, cfg.transport)
            sent = {n: own_memory(memory, owners[n].name) for n in targets}  # sliced once, for message and screen
            messages = [train_message(plan, sent[n], span, rnd, fp, manifest, n, files, record) for n in targets]
            sent_bytes.update({owners[m.metadata.dst_node_id].name: message_bytes(m) for m in messages})
            need = needed(plan.server.quorum, len(targets))
            replies, cut = gather(grid, messages, need, plan.round_timeout)
            unanswered = (f"late: the round closed once {len(replies)} of {len(targets)} owners had replied "
                          f"(quorum {need}); a reply after that is dropped" if cut and len(replies) >= need
                          else "no reply")
            accepted, refused, broken = screen.screen(
                replies, {n: owners[n] for n in targets}, memory, unanswered,
                memory_of=sent.get if routed else None)
            received_bytes.update({a.owner.name: a.bytes for a in accepted})
            rejected.extend(refused)
            failed.extend(broken)
            if cfg.schedule == "cyclic":
                for a in accepted:
                    if a.metrics:
                        log.info("  %s trained: loss %.2f->%.3f", a.owner.name, a.metrics["first_loss"],
                                 a.metrics["final_loss"])
            bar.update(len(targets))
            return [(a.factors, a) for a in accepted]

        secure_seconds: dict[str, float] = {}
        if cfg.secure:
            agg, trained = _secure_round(grid, plan, rnd, owners, memory, fp, manifest, files, modules,
                                         sent_bytes, received_bytes, rejected, failed, secure_seconds)
            bar.update(len(owners))
        else:
            # Cyclic: one owner at a time, in the order of their names, each on the memory the one before left.
            agg, trained = run_round(cfg, rnd, visit_order(owners), memory, train,
                                     clip=plan.server.clip_updates and cfg.method == "exact",
                                     name_of=lambda a: a.owner.name)
        bar.close()
        names = [a.owner.name for a in trained]
        # A refused update does not stop the round (else any one owner could stop the federation by
        # sending junk): its owner took part; owners that failed or never answered did not. A quorum
        # below min-clients (a parallel round of few owners) is what a round needs.
        required = (min(plan.server.min_clients, needed(plan.server.quorum, len(owners)))
                    if cfg.schedule != "cyclic" else plan.server.min_clients)
        if agg is None or len(names) + len(rejected) < required:
            raise RuntimeError(f"round {rnd}: only {len(names)} usable updates ({len(rejected)} refused), "
                               f"{required} required")
        try:
            check_finite(stacked(agg.factors))
        except Rejected as err:
            raise RuntimeError(f"round {rnd}: {err}; nothing saved") from None
        memory = agg.factors
        clients_seen.update(names)
        owner_keys.update({a.owner.name: a.owner.key for a in trained if a.owner.key})
        # Under differential privacy owners report nothing but the update (screening drops anything else).
        client_metrics = {a.owner.name: a.metrics for a in trained if a.metrics}
        record = {
            "round": rnd,
            "clients": sorted(names),
            "client_metrics": client_metrics,
            # What the server checked and decided, per accepted update: the admitted key, ‖ΔW‖, weight.
            # Under secure aggregation no single update is seen, so there is no norm to record.
            "updates": {a.owner.name: {"key": a.owner.key, "node": a.node,
                                       **({} if cfg.secure else {"norm": a.norm}), "weight": w,
                                       "bytes_down": sent_bytes.get(a.owner.name, 0), "bytes_up": a.bytes}
                        for a, w in zip(trained, agg.weights)},
            # Bytes on the wire, counted from the messages (fedmem.flower.traffic).
            "traffic": {"transport": cfg.transport,
                        **round_traffic(sent_bytes, received_bytes, full_model)},
            "rejected": rejected,
            "failed": failed,
            "refused_nodes": refused_nodes,
            "truncation_error": agg.max_truncation_error,
        }
        if cfg.schedule == "cyclic":
            record["visit_order"] = names
        if cfg.secure:  # where a secure round's time goes (the masked step includes the training)
            record["secure_seconds"] = secure_seconds
        if dp.enabled:
            noise_history.append(z)
            full = 1.0 if cfg.schedule == "cyclic" else 1.0 / len(names)  # each update's weight before its clip
            record["privacy"] = {"epsilon": epsilon, "delta": dp.dp_delta, "budget": dp.dp_epsilon,
                                 "noise_multiplier": z, "clip": dp.dp_clip,
                                 # Under secure aggregation owners clip their own changes, unseen.
                                 "clipped": None if cfg.secure else sum(1 for w in agg.weights
                                                                         if w < full * (1 - 1e-9))}
        line = f"round {rnd}/{cfg.rounds}: {len(names)} clients" + _loss_text(client_metrics)
        if rejected:
            line += f", {len(rejected)} refused (" + ", ".join(
                r["owner"] or f"node {r['node']}" for r in rejected) + ")"
        if cfg.method == "exact" and cfg.schedule != "routed":
            line += f", truncation error {agg.max_truncation_error:.2e}"
        line += f", {describe(record['traffic'])}"
        if dp.enabled:
            clipped = ("each owner clipped its own" if cfg.secure
                       else f"{record['privacy']['clipped']} of {len(names)} updates clipped")
            line += f", ε {epsilon:.3g} of {dp.dp_epsilon:g} spent (δ {dp.dp_delta:g}; {clipped} to {dp.dp_clip:g})"
        if plan.questions:
            after = evaluate(plan.base_dir, memory, plan.questions, plan.device)
            record.update(_recall_record(after))
            line += f", recall {_recall_text(after)}"
        record["seconds"] = time.perf_counter() - started
        manifest = {
            "base_model": plan.base_dir,
            "base_fingerprint": fp,
            "round": rnd,
            "rounds": cfg.rounds,
            "clients": sorted(clients_seen),
            # Which key each owner's updates came with (deployed; names are the admitted ones).
            "owner_keys": dict(sorted(owner_keys.items())),
            "aggregation": {"method": cfg.method, "schedule": cfg.schedule, "rank": cfg.lora.rank,
                            "weights": ("none: each owner's LoRA kept apart" if cfg.schedule == "routed"
                                        else "equal per accepted owner"),
                            "clip": bool(plan.server.clip_updates), "secure": cfg.secure},
            "federation": cfg.to_dict(),
            "metrics": _published_metrics(record, dp.enabled),
        }
        if isinstance(memory, OwnerLoras):  # whose LoRA each block of components is (fedmem.routing)
            manifest[ROUTING] = memory.manifest()
        if dp.enabled:
            manifest["privacy"] = {
                "mechanism": "owner-level differential privacy: each update clipped, Gaussian noise on their sum "
                             "(added by the coordinator)",
                "epsilon": epsilon, "delta": dp.dp_delta, "budget": dp.dp_epsilon, "noise_multiplier": z,
                "clip": dp.dp_clip, "rounds": len(noise_history), "accountant": "opacus RDP",
            }
        # Metrics first: a crash between the two leaves a row without a checkpoint, which a
        # resumed run sets aside, never a checkpoint without its row.
        _append_jsonl(metrics_path, record)
        save_memory(out / "rounds" / f"round-{rnd:03d}", stacked(memory), Path(plan.base_dir), manifest,
                    signing_key=signing_key)
        # memory/ is always the newest round's memory, so `fedmem serve --follow OUT/memory` serves each
        # round as it lands; the rounds/ checkpoint above is what a resumed run trusts.
        save_memory(out / "memory", stacked(memory), Path(plan.base_dir), manifest, signing_key=signing_key)
        latest_saved = True
        if plan.publish:
            files = signed_files(out / "rounds" / f"round-{rnd:03d}")
        log.info("%s (%.0fs)", line, record["seconds"])
        summary["rounds"].append(record)
    if memory is None:
        raise RuntimeError("no round was completed, so there is no memory to save")
    if not latest_saved:  # a resumed run that had nothing left to do
        save_memory(out / "memory", stacked(memory), Path(plan.base_dir), manifest, signing_key=signing_key)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    if plan.publish:
        _publish(grid, roster.admitted(grid.get_node_ids()), manifest, plan, signed_files(out / "memory"))
    return summary


def make_server_app(plan: RunPlan) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_rounds(grid, plan)

    return app
