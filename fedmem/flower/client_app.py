"""Flower ClientApp: receive the memory, train on the local corpus, reply with tensors.

The corpus is found from the node's config: ``data`` (a directory, as a deployed
SuperNode is started with) or, in simulation, the ``partition-id``-th of the corpus
directories the app was built with. Corpus text never leaves this process.

Deployed (node config ``state``), every memory version the server sends is kept in
``state/memory`` for local use (``fedmem-client pull``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedmem.base_model import pick_device, resolve_base
from fedmem.client_policy import PolicyRefused, enforce_policy, policy_from_node_config
from fedmem.config import FederationConfig, NodeSettings
from fedmem.corpus import load_corpus
from fedmem.federation import base_fingerprint, client_update, set_threads
from fedmem.log import log_context, setup_logging
from fedmem.memory import MemoryFormatError
from fedmem.secure_sum import SecureAggregationError
from fedmem.signing import PINNED_KEY, receive_memory

from . import secure_round
from .messages import (
    CONFIG_KEY,
    INFO_KEY,
    MANIFEST_KEY,
    MEMORY_KEY,
    METRICS_KEY,
    SIGNED_MEMORY_KEY,
    UPDATE_KEY,
    factors_to_record,
    metrics_to_record,
    record_to_config,
    record_to_factors,
    record_to_memory_files,
)

log = logging.getLogger(__name__)

RECEIVED_MEMORY = "memory"
# How much an owner's process logs; `fedmem simulate -v/-q` sets it for its Ray workers.
VERBOSITY_ENV = "FEDMEM_VERBOSITY"


class FingerprintMismatch(RuntimeError):
    pass


def node_settings(context: Context, fallback: NodeSettings | None = None) -> NodeSettings:
    """This owner's own environment: the SuperNode's node config (``fedmem-client join`` writes
    device, base and threads there), else what the simulation was started with. Never the
    coordinator's: its device or paths say nothing about this machine."""
    fallback = fallback or NodeSettings()
    mine = {key: context.node_config[key] for key in ("device", "base", "threads") if key in context.node_config}
    return NodeSettings(device=str(mine.get("device", fallback.device)), base=str(mine.get("base", fallback.base)),
                        threads=int(mine.get("threads", fallback.threads)))


def keep_memory(msg: Message, context: Context, base: str) -> None:
    """Keep the memory this message carries in the node's state dir (the newest one received),
    exactly as the coordinator signed it: verified against the coordinator key pinned there (the
    signer's, pinned now, if none is yet), file by file, and against this client's base model."""
    if "state" not in context.node_config or MANIFEST_KEY not in msg.content:
        return
    manifest = json.loads(str(msg.content[MANIFEST_KEY]["json"]))
    if SIGNED_MEMORY_KEY not in msg.content:
        log.warning("memory of round %s not kept: the coordinator sent it unsigned", manifest.get("round"))
        return
    state = Path(str(context.node_config["state"]))
    try:
        files = record_to_memory_files(msg.content[SIGNED_MEMORY_KEY])
        _, pinned = receive_memory(files, state, base_fingerprint(base), RECEIVED_MEMORY)
    except (MemoryFormatError, ValueError) as err:
        log.warning("memory of round %s not kept: %s", manifest.get("round"), err)
        return
    if pinned:
        log.warning("pinned the coordinator's memory-signing key %s on first use in %s: every later memory must be "
                    "signed by it; compare it with the fingerprint `fedmem-server start` printed",
                    pinned, state / PINNED_KEY)


def make_client_app(corpus_dirs: list[str] | None = None, node: NodeSettings | None = None,
                    mods: list[Mod] | None = None) -> ClientApp:
    """The ClientApp. Deployed, the node config says where the corpus is (``data``) and this
    machine's settings; in simulation, ``corpus_dirs[partition-id]`` and ``node``. ``mods``:
    Flower client mods around every handler (the privacy audit records the replies with one)."""
    app = ClientApp(mods=mods)

    def corpus_dir(context: Context) -> Path:
        if "data" in context.node_config:
            return Path(str(context.node_config["data"]))
        return Path(corpus_dirs[int(context.node_config["partition-id"])])

    def trained(msg: Message, context: Context, secure: bool):
        """Check the recipe against this owner's limits and base model, then train: (config, the memory as
        received, result, fingerprint)."""
        settings = node_settings(context, node)
        set_threads(settings.threads)
        sent, server_round, wanted = record_to_config(msg.content[CONFIG_KEY])
        base = str(resolve_base(settings.base or None))
        config = FederationConfig(**sent["federation"])
        if config.secure != secure:
            # Owner-checkable: under a secure recipe an update never leaves unmasked, whatever is asked.
            raise SecureAggregationError("the recipe is secure, so an unmasked update is never sent" if config.secure
                                         else "a masked update was asked for under a recipe that is not secure")
        # The owner's limits on the coordinator's recipe: refused with the reason, never clamped.
        policy = policy_from_node_config(context.node_config)
        if policy is not None:
            try:
                enforce_policy(config, policy, base)
            except PolicyRefused as err:
                log.error("round %s refused: %s", server_round, err)
                raise
        mine = base_fingerprint(base)
        if mine != wanted:
            raise FingerprintMismatch(
                f"this client's base model ({mine[:19]}...) differs from the federation's ({wanted[:19]}...)"
            )
        keep_memory(msg, context, base)
        corpus = load_corpus(corpus_dir(context))
        memory = record_to_factors(msg.content[MEMORY_KEY], config.transport)
        with log_context(f"{corpus.name} round {server_round}"):
            result = client_update(
                base, corpus, memory, config, server_round,
                device=pick_device(settings.device),
                span=tuple(sent["span"]) if "span" in sent else None,
            )
        return config, memory, result, mine

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        setup_logging(int(os.environ.get(VERBOSITY_ENV, "0")))
        config, _, result, mine = trained(msg, context, secure=False)
        content = RecordDict({
            UPDATE_KEY: factors_to_record(result.factors, config.transport),
            # Under differential privacy the owner reports nothing but its update: the noise covers only that.
            METRICS_KEY: metrics_to_record({} if config.privacy.enabled else result.metrics),
            # No name: the coordinator knows the owner by its admitted key (deployed) or by what it
            # was told when it asked (the query below); the corpus directory's name is the owner's own.
            INFO_KEY: ConfigRecord({"base_fingerprint": mine}),
        })
        return Message(content=content, reply_to=msg)

    # Secure rounds (fedmem.flower.secure_round): four steps; only the third trains, and it sends
    # nothing but the factor it trained, under its masks: no metrics, no counts.
    app.train(secure_round.KEYS)(secure_round.owner_keys)
    app.train(secure_round.SHARES)(secure_round.owner_shares)
    app.train(secure_round.UNMASK)(secure_round.owner_unmask)

    @app.train(secure_round.MASKED)
    def train_masked(msg: Message, context: Context) -> Message:
        setup_logging(int(os.environ.get(VERBOSITY_ENV, "0")))
        secure_round.owner_open(msg, context)  # a wrong share refuses the round before any training
        config, memory, result, _ = trained(msg, context, secure=True)
        dp = config.privacy
        sketches = secure_round.owner_sketches(context, result.factors, memory, dp.dp_clip if dp.enabled else None)
        return secure_round.owner_masked(msg, context, sketches)

    @app.query()
    def name(msg: Message, context: Context) -> Message:
        # The server orders a cyclic round by the owners' names; the name is the corpus directory's.
        return Message(content=RecordDict({INFO_KEY: ConfigRecord({"client": corpus_dir(context).name})}), reply_to=msg)

    @app.evaluate()
    def receive_memory(msg: Message, context: Context) -> Message:
        # The server's last word: the finished memory. Keep it; nothing goes back.
        setup_logging(int(os.environ.get(VERBOSITY_ENV, "0")))
        keep_memory(msg, context, str(resolve_base(node_settings(context, node).base or None)))
        return Message(content=RecordDict(), reply_to=msg)

    return app


# What a deployed SuperNode loads (the app project names ``fedmem.flower.client_app:app``).
app = make_client_app()
