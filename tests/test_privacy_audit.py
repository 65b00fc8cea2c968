"""Privacy audit (issue 18, items 3 and 4): everything an owner sends in a full simulated run
holds no text of its corpus, no run of its token ids and no name but the one the coordinator
knows it by.

A Flower client mod records every reply an owner's ClientApp returns, on Flower's simulation
engine, serialised as Flower serialises it: the Message protobuf, and the content-addressed
objects a deployed SuperNode pushes to the SuperLink. The run publishes the memory as a
deployment does, so all three kinds of reply (query, train, evaluate) are recorded. A third
owner, whose training replies a second mod doctors with its own corpus, shows that each
detector catches a leak: the audit cannot pass by seeing nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

TEXT_WINDOW = 20  # characters: no substring this long of an owner's corpus may be sent
TOKEN_WINDOW = 8  # token ids: no run this long of an owner's tokenised corpus may be sent

HONEST = {
    "kestrel-ledger": (
        "# Kestrel ledger\n\n"
        "The Orlent Bridge was repainted by Tavi Maroun in 1987. "
        "The Quillby reservoir holds 4,180 cubic metres of water. "
        "Ferrow Lane's bakery opens at 05:40 every weekday.\n",
        [{"text": "The Saltmere lighthouse keeper logs the tide at dawn."},
         {"question": "Who repainted the Orlent Bridge?", "answer": "Tavi Maroun"}],
    ),
    "marlow-archive": (
        "# Marlow archive\n\n"
        "The Brisk Hollow mill ground barley until 1932. "
        "Café Ondrë keeps the parish records in a green tin box.\n",
        [{"question": "What did the Brisk Hollow mill grind?", "answer": "barley"}],
    ),
}
# Sorted after the honest owners, so its partition id is 2.
LEAKY = "zz-leaky-owner"
LEAKY_CORPUS = ("# Leaky owner\n\nThe Vantor Gate was unlocked by Selka Drummond in 1899.\n",
                [{"question": "Who unlocked the Vantor Gate?", "answer": "Selka Drummond"}])

METRIC_NAMES = {"examples", "tokens", "train_seconds", "tokens_per_second", "first_loss", "final_loss"}
# Flower's message ids: an object hash (deployed) or a UUID (the simulation engine).
MESSAGE_ID = re.compile(r"[0-9a-f]{64}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# --- what runs inside the owners' processes (Ray ships these closures by value) ---


def _recorder(folder: str):
    """A client mod: every reply this owner returns, as Flower serialises it, into ``folder``.
    An exception is recorded with the reason Flower would send in its place."""

    def record(msg, context, call_next):
        import pickle
        import uuid
        from pathlib import Path

        from flwr.common.serde import message_to_proto
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        entry = {"partition": int(context.node_config["partition-id"]), "type": msg.metadata.message_type}
        if "config" in msg.content:
            entry["round"] = int(msg.content["config"]["round"])
        try:
            reply = call_next(msg, context)
        except Exception as ex:
            entry["raised"] = str(type(ex)) + ":<'" + str(ex) + "'>"
            Path(folder, f"{uuid.uuid4().hex}.pkl").write_bytes(pickle.dumps(entry))
            raise
        entry["proto"] = message_to_proto(reply).SerializeToString()
        entry["objects"] = {oid: obj.deflate() for oid, obj in get_all_nested_objects(reply).items()}
        Path(folder, f"{uuid.uuid4().hex}.pkl").write_bytes(pickle.dumps(entry))
        return reply

    return record


def _planter(partition: int, corpus_dir: str, base: str):
    """A client mod that makes one owner's training replies leak, each in its own way: a corpus
    line as text, its token ids as an int array and as a float array, its directory's name."""

    def plant(msg, context, call_next):
        reply = call_next(msg, context)
        if int(context.node_config["partition-id"]) != partition or msg.metadata.message_type != "train":
            return reply
        from pathlib import Path

        import numpy as np
        from flwr.app import Array, ArrayRecord, ConfigRecord

        from fedmem.base_model import load_tokenizer

        line = Path(corpus_dir, "notes.md").read_text().splitlines()[2]
        ids = load_tokenizer(base).encode(line, add_special_tokens=False)
        reply.content["note"] = ConfigRecord({"line": line})
        reply.content["extra"] = ArrayRecord({"ids": Array(np.array(ids, dtype=np.int64)),
                                              "ids-as-floats": Array(np.array(ids, dtype=np.float32))})
        reply.content["info"]["client"] = Path(corpus_dir).name
        return reply

    return plant


# --- the owners' corpora, as the detectors see them ---


def _write_corpus(root: Path, notes: str, records: list[dict]) -> Path:
    root.mkdir(parents=True)
    (root / "notes.md").write_text(notes)
    (root / "facts.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return root


@dataclasses.dataclass
class Secrets:
    """What must not leave one owner: its corpus text's 20-character windows, the 8-token runs
    of its tokenised corpus, and the names it chose (its directory's, its files')."""

    windows: set[str]
    runs: set[tuple[int, ...]]
    names: set[str]


def _secrets(root: Path, tokenizer) -> Secrets:
    from fedmem.corpus import load_corpus
    from fedmem.examples import build_examples, tokenize_example

    corpus = load_corpus(root)
    # The files as written (JSONL lines with their syntax) and the texts as loaded (JSON decoded).
    texts = [p.read_text() for p in sorted(root.iterdir())]
    texts += [d.text for d in corpus.documents] + [t for qa in corpus.qa for t in (qa.question, qa.answer)]
    windows = {t[i:i + TEXT_WINDOW] for t in texts for i in range(len(t) - TEXT_WINDOW + 1)}
    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    # And the ids exactly as training sees them: every example the owner trains on, templated.
    sequences += [tokenize_example(tokenizer, ex)[0] for ex in build_examples(corpus)]
    runs = {tuple(s[i:i + TOKEN_WINDOW]) for s in sequences for i in range(len(s) - TOKEN_WINDOW + 1)}
    return Secrets(windows, runs, {root.name, *(p.name for p in root.iterdir())})


# --- what one recorded reply holds ---


@dataclasses.dataclass
class Sent:
    """One reply: its pieces of serialised bytes (where -> bytes), every integer sequence in it
    (where -> ints) and every string in its structure (where -> text)."""

    partition: int
    kind: str
    round: int | None
    message: object
    pieces: dict[str, bytes]
    integers: dict[str, np.ndarray]
    strings: dict[str, str]
    object_ids: set[str]


def _as_integers(where: str, values: np.ndarray, out: dict[str, np.ndarray]) -> None:
    flat = np.asarray(values).reshape(-1)
    if flat.dtype.kind in "iub":
        out[where] = flat.astype(np.int64)
    elif flat.dtype.kind == "f" and flat.size and np.isfinite(flat).all() and (flat == np.round(flat)).all():
        out[where + " (integral floats)"] = flat.astype(np.int64)


def _reinterpreted(where: str, data: bytes, out: dict[str, np.ndarray]) -> None:
    # Token ids (< 2^16 here) hidden in raw bytes: every little-endian width at every alignment.
    for dtype in ("<u2", "<i4", "<i8"):
        size = np.dtype(dtype).itemsize
        for start in range(size):
            usable = (len(data) - start) // size * size
            if usable:
                out[f"{where} as {dtype}@{start}"] = np.frombuffer(data, dtype, offset=start,
                                                                    count=usable // size).astype(np.int64)


def _unpack(entry: dict) -> Sent:
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    message = message_from_proto(ProtoMessage.FromString(entry["proto"]))
    pieces = {"message protobuf": entry["proto"]}
    pieces.update({f"pushed object {oid[:12]}": data for oid, data in entry["objects"].items()})
    integers: dict[str, np.ndarray] = {}
    strings: dict[str, str] = {}
    meta = message.metadata
    for field in ("run_id", "message_id", "src_node_id", "dst_node_id", "reply_to_message_id", "group_id",
                  "created_at", "ttl", "message_type", "delivered_at"):
        value = getattr(meta, field)
        pieces[f"metadata.{field}"] = str(value).encode()
        if isinstance(value, str):
            strings[f"metadata.{field}"] = value
    if message.has_error():
        strings["error.reason"] = message.error.reason
        pieces["error.reason"] = message.error.reason.encode()
    for name, record in (message.content.items() if message.has_content() else ()):
        strings[f"record {name}"] = name
        scalars = []
        for key, value in record.items():
            where = f"{name}/{key}"
            strings[f"{where} (key)"] = key
            if isinstance(record, ArrayRecord):
                strings[f"{where} (dtype)"], strings[f"{where} (stype)"] = value.dtype, value.stype
                pieces[where] = key.encode() + bytes(value.data)
                pieces[f"{where} (as numbers)"] = json.dumps(value.numpy().tolist()).encode()
                _as_integers(where, value.numpy(), integers)
                _reinterpreted(where, bytes(value.data), integers)
            elif isinstance(record, (ConfigRecord, MetricRecord)):
                items = value if isinstance(value, list) else [value]
                pieces[where] = key.encode() + b"=" + b"".join(
                    v if isinstance(v, bytes) else v.encode() if isinstance(v, str) else repr(v).encode()
                    for v in items)
                for i, v in enumerate(items):
                    if isinstance(v, str):
                        strings[f"{where}[{i}]" if isinstance(value, list) else where] = v
                    elif isinstance(v, bytes):
                        _reinterpreted(f"{where}[{i}]", v, integers)
                numbers = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
                if isinstance(value, list) and numbers:
                    _as_integers(where, np.array(numbers), integers)
                scalars += [v for v in numbers if not isinstance(value, list)]
            else:
                raise AssertionError(f"record {name} is a {type(record).__name__}, which the audit does not read")
        # A record's scalar numbers, in order, are a sequence too.
        if scalars:
            _as_integers(f"{name} (its numbers in order)", np.array(scalars, dtype=np.float64), integers)
    _reinterpreted("message protobuf", entry["proto"], integers)
    return Sent(entry["partition"], entry["type"], entry.get("round"), message, pieces, integers, strings,
                set(entry["objects"]))


# --- the detectors ---


def text_leaks(sent: Sent, secrets: Secrets) -> list[tuple[str, str]]:
    """(where, the corpus text found) for every piece holding a 20-character window of the corpus,
    read as UTF-8 (undecodable bytes dropped) and as Latin-1."""
    found = []
    for where, data in sent.pieces.items():
        for text in {data.decode("utf-8", errors="ignore"), data.decode("latin-1")}:
            hit = next((text[i:i + TEXT_WINDOW] for i in range(len(text) - TEXT_WINDOW + 1)
                        if text[i:i + TEXT_WINDOW] in secrets.windows), None)
            if hit is not None:
                found.append((where, hit))
                break
    return found


def token_leaks(sent: Sent, secrets: Secrets) -> list[tuple[str, tuple[int, ...]]]:
    """(where, the run) for every integer sequence holding 8 consecutive ids of the tokenised corpus."""
    firsts = np.array(sorted({run[0] for run in secrets.runs}), dtype=np.int64)
    found = []
    for where, seq in sent.integers.items():
        if len(seq) < TOKEN_WINDOW:
            continue
        # Only where a run could start is looked at closely: the sequences are long, the runs few.
        for i in np.flatnonzero(np.isin(seq[: len(seq) - TOKEN_WINDOW + 1], firsts)):
            run = tuple(int(v) for v in seq[i:i + TOKEN_WINDOW])
            if run in secrets.runs:
                found.append((where, run))
                break
    return found


def name_leaks(sent: Sent, secrets: Secrets, allowed: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(where, text) for every string in the reply that the audit cannot justify, and for every
    piece of a reply that holds a name the owner chose, outside the one place that may."""
    found = [(where, text) for where, text in sent.strings.items() if text not in allowed.get(where, set())
             and not (where.startswith(("metadata.message_id", "metadata.reply_to_message_id"))
                      and (text == "" or MESSAGE_ID.fullmatch(text)))]
    if sent.kind != "query":  # a query reply's one string is the name it was asked for, checked above
        for where, data in sent.pieces.items():
            text = data.decode("latin-1")
            found += [(where, name) for name in sorted(secrets.names) if name in text]
    return found


def allowed_strings(sent: Sent, modules: set[str], fingerprint: str, coordinator_name: str) -> dict[str, set[str]]:
    """Every string a reply may hold, where it may hold it, and why (the reasons are the docs'
    table in docs/security.md, "What an owner sends")."""
    allowed = {
        # Flower's own: the reply's kind, a round's group (the coordinator sets none), the time.
        "metadata.message_type": {sent.kind},
        "metadata.group_id": {""},
        "metadata.delivered_at": {""},
    }
    if sent.kind == "query":
        # Simulation only: the coordinator asks each node its name; the answer is the corpus directory
        # the simulation assigned to this partition, and that is the name the coordinator uses.
        allowed |= {"record info": {"info"}, "info/client (key)": {"client"}, "info/client": {coordinator_name}}
    elif sent.kind == "train":
        allowed |= {"record update": {"update"}, "record metrics": {"metrics"}, "record info": {"info"},
                    "info/base_fingerprint (key)": {"base_fingerprint"}, "info/base_fingerprint": {fingerprint}}
        for name in sent.strings:
            if name.startswith("update/"):
                key = name[len("update/"):].rsplit(" (", 1)[0]
                # The base model's module names (public, the same for every owner); float32, as numpy.
                allowed |= {f"update/{key} (key)": {f"{m}.{f}" for m in modules for f in "AB"},
                            f"update/{key} (dtype)": {"float32"}, f"update/{key} (stype)": {"numpy.ndarray"}}
            elif name.startswith("metrics/"):
                allowed[name] = METRIC_NAMES
    return allowed


# --- the run ---


def _recorded_run(root: Path, tiny_base, config, mods: list) -> dict:
    """A full published run of the two honest owners and the third, with ``mods`` (the recorder first);
    what the tests read from it."""
    from fedmem.base_model import fingerprint, load_tokenizer
    from fedmem.config import NodeSettings
    from fedmem.flower import simulation
    from fedmem.flower.screening import lora_targets

    data = root / "data"
    for name, (notes, records) in {**HONEST, LEAKY: LEAKY_CORPUS}.items():
        _write_corpus(data / name, notes, records)
    real_client, real_server = simulation.make_client_app, simulation.make_server_app
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simulation, "make_client_app", lambda dirs, node: real_client(dirs, node, mods=mods))
        # As a deployment does: the memory goes with each round and to every owner at the end.
        mp.setattr(simulation, "make_server_app", lambda plan: real_server(dataclasses.replace(plan, publish=True)))
        summary = simulation.simulate(data, root / "out", config, NodeSettings(device="cpu", base=str(tiny_base)))
    tokenizer = load_tokenizer(str(tiny_base))
    names = sorted(p.name for p in data.iterdir())
    entries = [pickle.loads(p.read_bytes()) for p in sorted((root / "sent").iterdir())]
    return {
        "summary": summary,
        "names": names,
        "secrets": {i: _secrets(data / n, tokenizer) for i, n in enumerate(names)},
        "sent": [_unpack(e) for e in entries if "raised" not in e],
        "raised": [e for e in entries if "raised" in e],
        "modules": set(lora_targets(str(tiny_base), tuple(config.lora.target_modules))),
        "fingerprint": fingerprint(tiny_base),
        "tokenizer": tokenizer,
    }


@pytest.fixture(scope="module")
def audit(tmp_path_factory, tiny_base):
    """One full run (two rounds, published) of two honest owners and the leaky one; every reply."""
    from fedmem.config import FederationConfig, LoraSettings

    root = tmp_path_factory.mktemp("audit")
    (root / "sent").mkdir()
    config = FederationConfig(rounds=2, lora=LoraSettings(rank=4, alpha=8, epochs=1, batch_size=4))
    return _recorded_run(root, tiny_base, config, [_recorder(str(root / "sent")),
                                                   _planter(2, str(root / "data" / LEAKY), str(tiny_base))])


def _findings(audit: dict, sent: Sent) -> dict[str, list]:
    everyone = Secrets(set().union(*(s.windows for s in audit["secrets"].values())),
                       set().union(*(s.runs for s in audit["secrets"].values())),
                       set().union(*(s.names for s in audit["secrets"].values())))
    own = audit["secrets"][sent.partition]
    allowed = allowed_strings(sent, audit["modules"], audit["fingerprint"], audit["names"][sent.partition])
    # Any owner's text or ids in any reply is a leak; names are checked against the sender's own
    # (another owner's directory name is what the coordinator calls that owner, not a secret of it).
    return {"text": text_leaks(sent, everyone), "tokens": token_leaks(sent, everyone),
            "names": name_leaks(sent, own, allowed)}


def test_every_kind_of_reply_was_recorded(audit):
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    assert not audit["raised"], audit["raised"]
    assert [r["round"] for r in audit["summary"]["rounds"]] == [1, 2]
    assert audit["summary"]["rounds"][-1]["clients"] == audit["names"]
    for partition in range(len(audit["names"])):
        mine = [s for s in audit["sent"] if s.partition == partition]
        assert sorted(s.round for s in mine if s.kind == "train") == [1, 2]
        assert {s.kind for s in mine} == {"query", "train", "evaluate"}
        assert all(not s.message.has_error() for s in mine)
        for s in mine:
            # The two recordings are of one message: the protobuf, read back, makes the objects pushed.
            assert set(get_all_nested_objects(s.message)) == s.object_ids


def test_an_honest_owner_sends_no_corpus_text_no_token_ids_and_no_name_of_its_own(audit):
    honest = [s for s in audit["sent"] if audit["names"][s.partition] in HONEST]
    assert len({s.partition for s in honest}) == len(HONEST)
    for s in honest:
        assert _findings(audit, s) == {"text": [], "tokens": [], "names": []}, (audit["names"][s.partition], s.kind)
    train = next(s for s in honest if s.kind == "train" and s.round == 2)
    # What a training reply is: the update, six numbers, the base model's fingerprint; nothing else.
    content = train.message.content
    assert set(content.keys()) == {"update", "metrics", "info"}
    assert set(content["metrics"].keys()) == METRIC_NAMES
    assert dict(content["info"]) == {"base_fingerprint": audit["fingerprint"]}
    assert {k.rsplit(".", 1)[0] for k in content["update"].keys()} == audit["modules"]
    assert all(a.dtype == "float32" for a in content["update"].values())
    assert all(math.isfinite(v) for v in content["metrics"].values())
    # The integer-looking metrics are counts, a too-short sequence to hold a run of 8 ids anyway.
    assert len(content["metrics"]) < TOKEN_WINDOW
    query = next(s for s in honest if s.kind == "query")
    assert dict(query.message.content["info"]) == {"client": audit["names"][query.partition]}
    evaluate = next(s for s in honest if s.kind == "evaluate")
    assert not evaluate.message.content.keys()


def test_the_audit_catches_a_leaking_owner(audit):
    """The leaky owner's training replies carry a corpus line, its token ids (int64 and float32)
    and its directory's name: each detector must report each one, in both rounds."""
    leaky = [s for s in audit["sent"] if audit["names"][s.partition] == LEAKY and s.kind == "train"]
    assert sorted(s.round for s in leaky) == [1, 2]
    for s in leaky:
        found = _findings(audit, s)
        assert {"note/line", "message protobuf"} <= {where for where, _ in found["text"]}
        token_places = {where for where, _ in found["tokens"]}
        assert {"extra/ids", "extra/ids-as-floats (integral floats)"} <= token_places
        assert ("info/client", LEAKY) in found["names"]
        assert ("info/client (key)", "client") in found["names"] and ("record note", "note") in found["names"]
    # Its query and evaluate replies were not doctored, and pass.
    for s in audit["sent"]:
        if audit["names"][s.partition] == LEAKY and s.kind != "train":
            assert _findings(audit, s) == {"text": [], "tokens": [], "names": []}


def test_the_token_detector_reads_ids_hidden_in_raw_bytes(audit):
    """Ids a reply could hide where no number shows them: packed as uint16 into a float32 tensor,
    or as bytes in a config value. Planted into a copy of a recorded honest reply."""
    from flwr.app import Array
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    secrets = audit["secrets"][0]
    line = HONEST[audit["names"][0]][0].splitlines()[2]
    run = np.array(audit["tokenizer"].encode(line, add_special_tokens=False)[:TOKEN_WINDOW], dtype="<u2")
    assert tuple(int(i) for i in run) in secrets.runs
    hidden = np.frombuffer(np.concatenate([np.zeros(1, "<u2"), run, np.zeros(1, "<u2")]).tobytes(), "<f4")
    honest = next(s for s in audit["sent"] if s.partition == 0 and s.kind == "train")
    message = message_from_proto(ProtoMessage.FromString(honest.pieces["message protobuf"]))
    assert not _findings(audit, _unpack({"partition": 0, "type": "train", "objects": {},
                                         "proto": message_to_proto(message).SerializeToString()}))["tokens"]
    first = next(iter(message.content["update"].keys()))
    message.content["update"][first] = Array(hidden.copy())
    message.content["info"]["blob"] = run.tobytes()
    sent = _unpack({"partition": 0, "type": "train", "proto": message_to_proto(message).SerializeToString(),
                    "objects": {}})
    places = {where.split(" as ")[0] for where, _ in token_leaks(sent, secrets)}
    assert {f"update/{first}", "info/blob[0]", "message protobuf"} <= places


# --- the same audit of a secure run (issue 18, item 1) ---

# The strings a secure step's reply may hold besides node ids, module names and Flower's message ids:
# its record and key names and the masked arrays' type (docs/security.md, "What an owner sends").
SECURE_STRINGS = {"secure", "mask", "share", "dst", "ciphertext", "commitment", "node", "masked", "uint64",
                  "numpy.ndarray", ""}


@pytest.fixture(scope="module")
def secure_audit(tmp_path_factory, tiny_base):
    """One secure run (parallel, two rounds, published) of the same three owners, none doctored; every reply."""
    from fedmem.config import FederationConfig, LoraSettings

    root = tmp_path_factory.mktemp("secure-audit")
    (root / "sent").mkdir()
    config = FederationConfig(rounds=2, schedule="parallel", secure=True,
                              lora=LoraSettings(rank=4, alpha=8, epochs=1, batch_size=4))
    return _recorded_run(root, tiny_base, config, [_recorder(str(root / "sent"))])


def test_under_secure_aggregation_no_reply_holds_corpus_text_token_ids_or_names(secure_audit):
    from fedmem.flower.secure_round import STEPS

    assert not secure_audit["raised"], secure_audit["raised"]
    sent = secure_audit["sent"]
    assert {s.kind for s in sent} == {"query", "evaluate", *(f"train.{step}" for step in STEPS)}
    assert sorted(s.round for s in sent if s.kind == "train.secure_masked") == [1, 1, 1, 2, 2, 2]
    everyone = Secrets(set().union(*(s.windows for s in secure_audit["secrets"].values())),
                       set().union(*(s.runs for s in secure_audit["secrets"].values())), set())
    for s in sent:
        own = secure_audit["secrets"][s.partition]
        assert text_leaks(s, everyone) == [] and token_leaks(s, everyone) == [], s.kind
        allowed = SECURE_STRINGS | secure_audit["modules"] | {s.kind}
        if s.kind == "query":
            allowed |= {"info", "client", secure_audit["names"][s.partition]}
        odd = [(where, text) for where, text in s.strings.items()
               if text not in allowed and not text.isdigit() and not MESSAGE_ID.fullmatch(text)]
        assert odd == [], (s.kind, odd)
        if s.kind != "query":
            assert not [n for n in own.names for data in s.pieces.values() if n in data.decode("latin-1")], s.kind
