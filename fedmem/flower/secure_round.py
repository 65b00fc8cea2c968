"""A secure parallel round over Flower's Message API: four exchanges per round, both sides.

The math and the cryptography are ``fedmem.secure_sum``; this module carries its inputs and
outputs between the coordinator and the owners, and checks everything that arrives (sizes,
types, node ids, the order of the steps). An owner's secrets for the round live in its
Flower context (``context.state``), which both of Flower's engines keep between messages.

Coordinator (``secure_train``)               Owner (``owner_*``)
  keys:    session, round  ────────────────▶  fresh key pairs; public halves back
  shares:  every owner's public keys ──────▶  seed; encrypted shares for each other owner
  masked:  the training message + the
           shares addressed to that owner ─▶  trains its LoRA; sketches of B·A masked back
  unmask:  who sent, who dropped ──────────▶  shares of survivors' seeds, dropped owners' keys

What an owner masks is a linear sketch of the product B·A of the LoRA it trained
(``fedmem.aggregate.sketch``), with sketch operators both sides draw from the session's random bytes
and sized by the roster, so nothing about the layout travels: the coordinator's unmasked sum is the
sketch of the owners' summed products, from which it rebuilds the round's memory as a plain parallel
round would have it.

An owner answers each step once per session and in that order, and the unmask step only
once: asked twice, with another split of survivors and dropped owners, it could reveal both
secrets of one owner and with them that owner's update.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedmem import secure_sum
from fedmem.aggregate import change, sketch, sketch_operators, sketch_sizes, update_norm
from fedmem.privacy import clip_scale
from fedmem.validate import clean

from .messages import message_bytes
from .quorum import gather, needed

log = logging.getLogger(__name__)

SECURE_KEY = "secure"  # the config record every secure message carries
MASKED_KEY = "masked"  # the owner's sketch of its B·A, masked: one uint64 vector per module
STATE_KEY = "fedmem.secure"  # the owner's secrets between the steps, in its Flower context
KEYS, SHARES, MASKED, UNMASK = "secure_keys", "secure_shares", "secure_masked", "secure_unmask"
STEPS = (KEYS, SHARES, MASKED, UNMASK)
SESSION_BYTES = 16
SHARE_CIPHERTEXT_BYTES = 12 + 2 * (4 + secure_sum.SECRET_BYTES) + 16  # nonce, two shares, tag


def message_type(step: str) -> str:
    return f"{MessageType.TRAIN}.{step}"


# --- owner side ------------------------------------------------------------------------------


def _state(context: Context) -> ConfigRecord:
    if STATE_KEY not in context.state.config_records:
        context.state.config_records[STATE_KEY] = ConfigRecord({})
    return context.state.config_records[STATE_KEY]


def _request(msg: Message, step: str) -> ConfigRecord:
    if SECURE_KEY not in msg.content.config_records:
        raise secure_sum.SecureAggregationError(f"the {step} message carries no '{SECURE_KEY}' record")
    request = msg.content.config_records[SECURE_KEY]
    session = request.get("session")
    if not isinstance(session, bytes) or len(session) != SESSION_BYTES:
        raise secure_sum.SecureAggregationError(f"the {step} message's session is not {SESSION_BYTES} bytes")
    return request


def _expect(state: ConfigRecord, request: ConfigRecord, step: str) -> None:
    """This step must follow the previous one of the same session, once."""
    before = STEPS[STEPS.index(step) - 1]
    if state.get("session") != request["session"] or state.get("step") != before:
        raise secure_sum.SecureAggregationError(
            f"a {step} request out of order (this owner's last step in this session: {state.get('step', 'none')})")


def _wire(ids) -> list[str]:
    """Node ids as they travel and are kept: decimal strings (Flower's are unsigned 64-bit, a config
    record's integers signed)."""
    return [str(int(n)) for n in ids]


def _node_ids(value, what: str) -> list[int]:
    """Node ids from a list of decimal strings; anything else is refused, naming ``what``."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v.isdigit() and len(v) <= 20 for v in value):
        raise secure_sum.SecureAggregationError(f"{what} is not a list of node ids")
    ids = [int(v) for v in value]
    if any(n >= 2**64 for n in ids):
        raise secure_sum.SecureAggregationError(f"{what} holds a node id beyond 64 bits")
    return ids


def _roster(state: ConfigRecord) -> dict[int, tuple[bytes, bytes]]:
    return {int(n): (m, s) for n, m, s in zip(state["roster"], state["roster_mask"], state["roster_share"])}


def _keys(state: ConfigRecord) -> secure_sum.OwnerKeys:
    keys = secure_sum.OwnerKeys(state["mask_private"], state["share_private"], state.get("seed", b""))
    keys.held = {int(n): (a, b) for n, a, b in zip(state.get("held", []), state.get("held_seed", []),
                                                    state.get("held_key", []))}
    return keys


def _reply(msg: Message, values: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({SECURE_KEY: ConfigRecord(values)})
    if arrays is not None:
        content[MASKED_KEY] = arrays
    return Message(content=content, reply_to=msg)


def owner_keys(msg: Message, context: Context) -> Message:
    """Step 1: fresh key pairs for this session (any earlier session's secrets are dropped)."""
    request = _request(msg, KEYS)
    keys = secure_sum.OwnerKeys.fresh()
    context.state.config_records[STATE_KEY] = ConfigRecord({
        "session": request["session"], "step": KEYS, "me": str(msg.metadata.dst_node_id),
        "mask_private": keys.mask_private, "share_private": keys.share_private})
    mask_public, share_public = keys.public()
    return _reply(msg, {"mask": mask_public, "share": share_public})


def owner_shares(msg: Message, context: Context) -> Message:
    """Step 2: check the roster the coordinator relays, and send each other owner its shares."""
    request, state = _request(msg, SHARES), _state(context)
    _expect(state, request, SHARES)
    ids = _node_ids(request.get("roster"), "the roster")
    masks, shares = request.get("roster_mask"), request.get("roster_share")
    if not (isinstance(masks, list) and isinstance(shares, list) and len(ids) == len(masks) == len(shares)):
        raise secure_sum.SecureAggregationError(
            "the roster is not three lists of one length (ids, mask keys, share keys)")
    if len(set(ids)) != len(ids):
        raise secure_sum.SecureAggregationError("the roster names an owner twice")
    roster = dict(zip(ids, zip(masks, shares)))
    keys = _keys(state)
    me = int(state["me"])
    secure_sum.check_roster(roster, me, keys.public())
    ciphertexts, commitment = secure_sum.share_secrets(keys, me, roster, request["session"])
    state.update({"step": SHARES, "roster": _wire(roster), "roster_mask": [roster[n][0] for n in roster],
                  "roster_share": [roster[n][1] for n in roster], "seed": keys.seed})
    _store_held(state, keys)
    return _reply(msg, {"dst": _wire(ciphertexts), "ciphertext": list(ciphertexts.values()), "commitment": commitment})


def _store_held(state: ConfigRecord, keys: secure_sum.OwnerKeys) -> None:
    state.update({"held": _wire(keys.held), "held_seed": [s for s, _ in keys.held.values()],
                  "held_key": [k for _, k in keys.held.values()]})


def sketch_seed(session: bytes) -> int:
    """The seed of a session's sketch operators: its random bytes, which the coordinator drew and every
    owner was sent, so both sides draw the same operators and no seed of the coordinator's choosing travels."""
    return int.from_bytes(session[:8], "little")


def sketch_terms(owners: int, private: bool) -> int:
    """How many rank-r terms the sketched sum holds: the owners' products, or under differential privacy
    their clipped changes B'A' − B_mA_m, which add the memory's term."""
    return owners + 1 if private else owners


def owner_sketches(context: Context, factors, memory=None, clip: float | None = None) -> dict[str, torch.Tensor]:
    """Step 3, after training: module -> the sketch (``fedmem.aggregate.sketch``) of this owner's B·A, or with
    ``clip`` (differential privacy) of its change from ``memory`` (the memory it was sent) scaled to Frobenius
    norm at most ``clip`` over all modules: the owner clips its own update, since the coordinator never sees
    it. Sized by the roster this owner checked in step 2 and its own factors' shapes, seeded by the session."""
    state = _state(context)
    terms, seed = sketch_terms(len(state["roster"]), clip is not None), sketch_seed(state["session"])
    rank = next(iter(factors.values()))[1].shape[0]  # the LoRA's: a change stacks two of them
    if clip is not None:
        factors = change(factors, memory or None)
        scale = clip_scale(update_norm(factors), clip)
        factors = {n: (B * scale, A) for n, (B, A) in factors.items()}
    out = {}
    for name, (B, A) in sorted(factors.items()):
        d_out, d_in = B.shape[0], A.shape[1]
        omega, psi = sketch_operators(name, d_out, d_in, *sketch_sizes(terms, rank, d_out, d_in), seed)
        out[name] = sketch(B, A, omega, psi)
    return out


def owner_masked(msg: Message, context: Context, trained) -> Message:
    """Step 3: send ``trained`` (module -> a tensor: the sketches of ``owner_sketches``; the caller trains,
    after ``owner_open``) in fixed point under its masks."""
    request, state = _request(msg, MASKED), _state(context)
    keys = _keys(state)
    # One vector for the whole update, modules in name order, as the coordinator sums and unmasks it.
    names = sorted(trained)
    encoded = [secure_sum.encode(trained[n].detach().double().cpu().numpy()) for n in names]
    clipped = sum(n for _, n in encoded)
    masked = secure_sum.mask(np.concatenate([f.ravel() for f, _ in encoded]), keys, int(state["me"]),
                             _roster(state), request["session"])
    arrays, start = {}, 0
    for name, (fixed, _) in zip(names, encoded):
        arrays[name] = Array(masked[start:start + fixed.size].reshape(fixed.shape))
        start += fixed.size
    if clipped:
        log.warning("%d values of this owner's update were beyond ±%g and were clipped for secure aggregation",
                    clipped, secure_sum.BOUND)
    state.update({"step": MASKED})
    return _reply(msg, {}, ArrayRecord(arrays))


def owner_open(msg: Message, context: Context) -> None:
    """Step 3, before training: the shares this owner was sent, opened and kept (a wrong one refuses the round)."""
    request, state = _request(msg, MASKED), _state(context)
    _expect(state, request, MASKED)
    srcs, blobs = _node_ids(request.get("src"), "the shares' senders"), request.get("ciphertext")
    if not (isinstance(blobs, list) and len(srcs) == len(blobs) and all(isinstance(b, bytes) for b in blobs)):
        raise secure_sum.SecureAggregationError("the shares are not a list of senders and one of ciphertexts")
    if len(set(srcs)) != len(srcs):
        raise secure_sum.SecureAggregationError("two shares from the same owner")
    keys = _keys(state)
    roster = _roster(state)
    secure_sum.open_shares(keys, int(state["me"]), roster, request["session"], dict(zip(srcs, blobs)))
    if len(keys.held) < secure_sum.threshold(len(roster)):
        raise secure_sum.SecureAggregationError(
            f"shares from {len(keys.held)} owners, {secure_sum.threshold(len(roster))} needed")
    _store_held(state, keys)


def owner_unmask(msg: Message, context: Context) -> Message:
    """Step 4: this owner's shares for the coordinator to remove the masks; once per session."""
    request, state = _request(msg, UNMASK), _state(context)
    _expect(state, request, UNMASK)
    survivors = _node_ids(request.get("survivors"), "the survivors")
    dropped = _node_ids(request.get("dropped"), "the dropped owners")
    me = int(state["me"])
    revealed = secure_sum.reveal(_keys(state), me, survivors, dropped, len(state["roster"]))
    state.update({"step": UNMASK})
    return _reply(msg, {"node": _wire(revealed), "share": list(revealed.values())})


# --- coordinator side --------------------------------------------------------------------------


@dataclass
class SecureOutcome:
    mean: dict[str, torch.Tensor]  # module -> the survivors' mean sketch (float64 vector)
    survivors: list[int]
    session: bytes = b""  # seeds the sketch operators (``sketch_seed``)
    owners: int = 0  # the roster's size, which sized the sketches
    failed: list[tuple[int, str]] = field(default_factory=list)  # (node, why), any step
    sent: dict[int, int] = field(default_factory=dict)  # node -> bytes of every message it was sent
    received: dict[int, int] = field(default_factory=dict)  # node -> bytes of every reply it sent
    liars: list[int] = field(default_factory=list)  # survivors that revealed a wrong share
    seconds: dict[str, float] = field(default_factory=dict)  # step -> wall clock (masked: training included)


class SecureRoundFailed(RuntimeError):
    pass


def _ask(grid, step: str, requests: dict[int, RecordDict], need: int, timeout: float | None,
         outcome: SecureOutcome) -> dict[int, Message]:
    """Send one step's messages; the usable replies by node (an error reply or none: failed)."""
    started = time.perf_counter()
    messages = [Message(content=c, message_type=message_type(step), dst_node_id=n) for n, c in requests.items()]
    for m in messages:
        outcome.sent[m.metadata.dst_node_id] = outcome.sent.get(m.metadata.dst_node_id, 0) + message_bytes(m)
    replies, _ = gather(grid, messages, need, timeout)
    out: dict[int, Message] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in requests or node in out:
            continue
        outcome.received[node] = outcome.received.get(node, 0) + message_bytes(reply)
        if reply.has_error():
            outcome.failed.append((node, f"{step}: {clean(reply.error.reason)}"))
        elif SECURE_KEY not in reply.content.config_records:
            outcome.failed.append((node, f"{step}: the reply has no '{SECURE_KEY}' record"))
        else:
            out[node] = reply
    for node in requests:
        if node not in out and all(node != n for n, _ in outcome.failed):
            outcome.failed.append((node, f"{step}: no reply"))
    outcome.seconds[step] = time.perf_counter() - started
    return out


def _secure_content(values: dict) -> RecordDict:
    return RecordDict({SECURE_KEY: ConfigRecord(values)})


def secure_train(grid, targets: list[int], train_content, modules: dict[str, tuple[int, int]], rank: int,
                 quorum: float, timeout: float | None, private: bool = False) -> SecureOutcome:
    """One secure round with the owners ``targets``: the survivors' mean sketch of their trained B·A,
    module by module.

    ``train_content(node)`` is the RecordDict of the usual training message for that owner (the
    memory and the recipe); ``modules``: module -> (d_out, d_in); ``rank``: the owners' LoRA rank;
    ``private``: owners sketch their clipped changes (``owner_sketches``), one term more.
    Raises ``SecureRoundFailed`` when too few owners are left at any step to go on."""
    outcome = SecureOutcome({}, [])
    session = os.urandom(SESSION_BYTES)
    t = secure_sum.threshold(len(targets))

    def at_least(count: int, step: str) -> None:
        if count < t:
            raise SecureRoundFailed(f"secure aggregation: {count} owners left after the {step} step, {t} needed")

    replies = _ask(grid, KEYS, {n: _secure_content({"session": session}) for n in targets}, len(targets),
                   timeout, outcome)
    roster: dict[int, tuple[bytes, bytes]] = {}
    for node, reply in replies.items():
        keys, problem = _public_keys(reply.content[SECURE_KEY])
        if keys is None:
            outcome.failed.append((node, f"{KEYS}: {problem}"))
        else:
            roster[node] = keys
    keys_seen = [k for pair in roster.values() for k in pair]
    if len(set(keys_seen)) != len(keys_seen):  # a copied key: its owner's masks would not cancel
        raise SecureRoundFailed("secure aggregation: two owners sent the same public key")
    at_least(len(roster), KEYS)
    t = secure_sum.threshold(len(roster))
    ids = sorted(roster)
    shapes = {name: (d_out * s + k * d_in,) for name, (d_out, d_in) in modules.items()
              for s, k in [sketch_sizes(sketch_terms(len(ids), private), rank, d_out, d_in)]}
    listing = {"session": session, "roster": _wire(ids), "roster_mask": [roster[n][0] for n in ids],
               "roster_share": [roster[n][1] for n in ids]}
    replies = _ask(grid, SHARES, {n: _secure_content(listing) for n in ids}, len(ids), timeout, outcome)
    mail: dict[int, dict[int, bytes]] = {n: {} for n in ids}  # receiver -> sender -> ciphertext
    commitments: dict[int, bytes] = {}
    for node, reply in replies.items():
        shares, problem = _shares(reply.content[SECURE_KEY], node, ids)
        if shares is None:
            outcome.failed.append((node, f"{SHARES}: {problem}"))
            continue
        dsts, blobs, commitments[node] = shares
        for dst, blob in zip(dsts, blobs):
            mail[dst][node] = blob
    sharing = sorted(commitments)
    at_least(len(sharing), SHARES)

    requests = {}
    for n in sharing:
        content = train_content(n)
        senders = [s for s in sharing if s != n]
        content[SECURE_KEY] = ConfigRecord({"session": session, "src": _wire(senders),
                                            "ciphertext": [mail[n][s] for s in senders]})
        requests[n] = content
    replies = _ask(grid, MASKED, requests, needed(quorum, len(sharing)), timeout, outcome)
    total = {name: np.zeros(shape, dtype=np.uint64) for name, shape in shapes.items()}
    survivors = []
    for node, reply in sorted(replies.items()):
        arrays, problem = _masked_arrays(reply.content.array_records.get(MASKED_KEY), shapes)
        if problem:
            outcome.failed.append((node, f"{MASKED}: {problem}"))
            continue
        for name in shapes:
            total[name] += arrays[name]  # uint64: wraps, as the ring does
        survivors.append(node)
    at_least(len(survivors), MASKED)
    dropped = [n for n in sharing if n not in survivors]

    replies = _ask(grid, UNMASK, {n: _secure_content({"session": session, "survivors": _wire(survivors),
                                                      "dropped": _wire(dropped)}) for n in survivors},
                   len(survivors), timeout, outcome)
    revealed: dict[int, dict[int, bytes]] = {}
    for node, reply in replies.items():
        r = reply.content[SECURE_KEY]
        shares = r.get("share")
        try:
            nodes = _node_ids(r.get("node"), "the revealed shares' owners")
        except secure_sum.SecureAggregationError as err:
            outcome.failed.append((node, f"{UNMASK}: {err}"))
            continue
        if not (isinstance(shares, list) and sorted(nodes) == sorted(survivors + dropped)
                and len(shares) == len(nodes) and all(isinstance(s, bytes) for s in shares)):
            outcome.failed.append((node, f"{UNMASK}: not one share for every owner of the round"))
            continue
        revealed[node] = dict(zip(nodes, shares))
    at_least(len(revealed), UNMASK)
    names = sorted(shapes)
    started = time.perf_counter()
    flat = np.concatenate([total[n] for n in names])
    try:
        summed, outcome.liars = secure_sum.unmask(flat, roster, session, survivors, dropped, revealed, commitments)
    except secure_sum.SecureAggregationError as err:
        raise SecureRoundFailed(f"secure aggregation: {err}") from None
    values = secure_sum.decode(summed) / len(survivors)
    start = 0
    for name in names:
        outcome.mean[name] = torch.from_numpy(values[start:start + shapes[name][0]].copy())
        start += shapes[name][0]
    outcome.survivors, outcome.session, outcome.owners = survivors, session, len(ids)
    outcome.seconds["unmask_sum"] = time.perf_counter() - started
    return outcome


def _public_keys(record: ConfigRecord) -> tuple[tuple[bytes, bytes] | None, str]:
    """((mask key, share key), "") from an owner's keys reply, or (None, what is wrong)."""
    mask, share = record.get("mask"), record.get("share")
    if isinstance(mask, bytes) and isinstance(share, bytes) and len(mask) == len(share) == 32:
        return (mask, share), ""
    return None, "the public keys are not two 32-byte keys"


def _shares(record: ConfigRecord, node: int, ids: list[int]) -> tuple[tuple[list[int], list, bytes] | None, str]:
    """((receivers, ciphertexts, commitment), "") from owner ``node``'s shares reply in a round of ``ids``: one
    ciphertext of the expected size for every other owner and a 32-byte commitment; or (None, what is wrong)."""
    blobs, commitment = record.get("ciphertext"), record.get("commitment")
    try:
        dsts = _node_ids(record.get("dst"), "the shares' receivers")
    except secure_sum.SecureAggregationError as err:
        return None, str(err)
    if not (isinstance(blobs, list) and sorted(dsts) == sorted(set(ids) - {node}) and len(blobs) == len(dsts)
            and all(isinstance(b, bytes) and len(b) == SHARE_CIPHERTEXT_BYTES for b in blobs)
            and isinstance(commitment, bytes) and len(commitment) == 32):
        return None, "not one share of the expected size for every other owner"
    return (dsts, blobs, commitment), ""


def _masked_arrays(record, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], str]:
    """(module -> the masked sketch as flat uint64, "") or ({}, what is wrong): the record's names, and each
    array's dtype and shape as declared and as decoded (a crafted array may declare one and carry another)."""
    if not isinstance(record, ArrayRecord):
        return {}, f"the reply has no '{MASKED_KEY}' array record"
    if sorted(record.keys()) != sorted(shapes):
        return {}, "the masked update covers other modules than the round's LoRA"
    out = {}
    for name, shape in shapes.items():
        array = record[name]
        try:
            values = array.numpy() if array.dtype == "uint64" else None
        except Exception as err:  # noqa: BLE001 - whatever crafted bytes make numpy raise
            return {}, f"{name}: cannot be read ({str(err)[:120]})"
        if values is None or values.dtype != np.uint64 or tuple(values.shape) != tuple(shape):
            got = f"{values.dtype} {tuple(values.shape)}" if values is not None else f"{array.dtype}"
            return {}, f"{name}: {got}, expected uint64 {tuple(shape)}"
        out[name] = values.ravel()
    return out, ""
