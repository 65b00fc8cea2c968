"""Flower ClientApp: receive the memory, train on the local corpus, reply with tensors.

The corpus is found from the node's config: ``data`` (a directory, as a deployed
SuperNode is started with) or, in simulation, the ``partition-id``-th of the corpus
directories the app was built with. Corpus text never leaves this process.

Deployed (node config ``state``), every memory version the server sends is kept in
``state/memory`` for local use (``fedmem-client pull``).
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedmem.base_model import pick_device, quiet_libraries
from fedmem.corpus import load_corpus
from fedmem.federation import FederationConfig, base_fingerprint, client_update, set_threads
from fedmem.memory import save_memory
from fedmem.messages import (CONFIG_KEY, INFO_KEY, MEMORY_KEY, METRICS_KEY, UPDATE_KEY, factors_to_record,
                             metrics_to_record, record_to_config, record_to_factors)


MANIFEST_KEY = "manifest"  # as fedmem.server.server_app sends it
RECEIVED_MEMORY = "memory"


class FingerprintMismatch(RuntimeError):
    pass


def keep_memory(msg: Message, context: Context, base: str) -> None:
    """Save the memory this message carries under the node's state dir: the newest one received."""
    if "state" not in context.node_config or MANIFEST_KEY not in msg.content:
        return
    manifest = json.loads(str(msg.content[MANIFEST_KEY]["json"]))
    if manifest.get("base_fingerprint") and manifest["base_fingerprint"] != base_fingerprint(base):
        print(f"memory of round {manifest.get('round')} not kept: it was made for another base model "
              f"({manifest['base_fingerprint'][:19]}...) than this client's ({base})", flush=True)
        return
    factors = record_to_factors(msg.content[MEMORY_KEY])
    if factors:
        manifest = {k: v for k, v in manifest.items() if k not in ("weights_sha256", "created", "format")}
        manifest["base_model"] = str(base)  # this machine's copy of the (identical) base model
        save_memory(Path(str(context.node_config["state"])) / RECEIVED_MEMORY, factors, Path(base), manifest)


def make_client_app(corpus_dirs: list[str] | None = None, base_dir: str | None = None) -> ClientApp:
    app = ClientApp()

    def corpus_dir(context: Context) -> Path:
        if "data" in context.node_config:
            return Path(str(context.node_config["data"]))
        return Path(corpus_dirs[int(context.node_config["partition-id"])])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        quiet_libraries()
        set_threads()
        if "threads" in context.node_config:  # an owner sharing the machine with other work
            import torch

            torch.set_num_threads(max(1, int(context.node_config["threads"])))
        run_config, server_round, wanted = record_to_config(msg.content[CONFIG_KEY])
        base = base_dir or str(context.node_config.get("base", run_config["base_dir"]))
        mine = base_fingerprint(base)
        if mine != wanted:
            raise FingerprintMismatch(
                f"this client's base model ({mine[:19]}...) differs from the federation's ({wanted[:19]}...)"
            )
        keep_memory(msg, context, base)
        config = FederationConfig(**run_config["federation"])
        corpus = load_corpus(corpus_dir(context))
        name = corpus.name
        result = client_update(
            base, corpus, record_to_factors(msg.content[MEMORY_KEY]), config, server_round,
            device=pick_device(run_config.get("device", "auto")),
            progress=lambda line: print(f"[{name}] round {server_round} {line}", flush=True),
            span=tuple(run_config["span"]) if "span" in run_config else None,
        )
        content = RecordDict({
            UPDATE_KEY: factors_to_record(result.factors),
            METRICS_KEY: metrics_to_record(result.metrics),
            INFO_KEY: ConfigRecord({"client": name, "base_fingerprint": mine}),
        })
        return Message(content=content, reply_to=msg)

    @app.query()
    def name(msg: Message, context: Context) -> Message:
        # The server orders a cyclic round by the owners' names; the name is the corpus directory's.
        return Message(content=RecordDict({INFO_KEY: ConfigRecord({"client": corpus_dir(context).name})}), reply_to=msg)

    @app.evaluate()
    def receive_memory(msg: Message, context: Context) -> Message:
        # The server's last word: the finished memory. Keep it; nothing goes back.
        base = base_dir or str(context.node_config.get("base", ""))
        if base:
            keep_memory(msg, context, base)
        return Message(content=RecordDict(), reply_to=msg)

    return app
