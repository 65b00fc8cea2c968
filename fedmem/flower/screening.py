"""Screening the owners' replies before aggregation: what the coordinator knows about the base
model, and each reply checked against it (the checks themselves are ``fedmem.validate``)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedmem.aggregate import change
from fedmem.config import FederationConfig, ServerSettings
from fedmem.validate import (
    Expected,
    Rejected,
    check_factors,
    check_metrics,
    check_norm,
    check_relative,
    clean,
    display_name,
    module_norms,
    norm_bound,
    total_norm,
)

from .messages import INFO_KEY, METRICS_KEY, UPDATE_KEY, message_bytes, record_to_factors
from .roster import Owner

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def lora_targets(base_dir: str, target_modules: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """module -> (d_out, d_in) of every Linear layer of the base model a LoRA with these
    target modules goes on, matched as PEFT matches them. Built on the meta device: no weights
    are read."""
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(target_modules=list(target_modules))
    found = {name: (m.out_features, m.in_features) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and check_target_module_exists(lora, name)}
    if not found:
        raise ValueError(f"target-modules {','.join(target_modules)} match no Linear layer of {base_dir}")
    return found


def base_weight_norms(base_dir: str, modules) -> dict[str, float]:
    """‖W‖_F of each module's base weight, read tensor by tensor from the safetensors files
    (modules whose weight is not found by name are left out)."""
    import torch
    from safetensors import safe_open

    wanted = {f"{name}.weight": name for name in modules}
    norms: dict[str, float] = {}
    for path in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                if key in wanted:
                    norms[wanted[key]] = float(torch.linalg.norm(fh.get_tensor(key).double()))
    return norms


# --- the replies ---


@dataclass
class Accepted:
    owner: Owner
    node: int
    factors: dict
    metrics: dict[str, float]
    norm: float  # ‖ΔW‖_F over all modules
    bytes: int = 0  # the reply's size on the wire (fedmem.flower.messages.message_bytes)


@dataclass
class Screen:
    """Checks replies against what the coordinator knows (``fedmem.validate``); keeps the
    ‖ΔW‖ of every update accepted in the run, the reference of the norm bound."""

    fp: str
    config: FederationConfig
    server: ServerSettings
    modules: dict[str, tuple[int, int]]
    base_norms: dict[str, float]
    accepted_norms: list[float] = field(default_factory=list)

    def check(self, reply: Message, owner: Owner, memory) -> Accepted:
        """One reply on its own: every check but the norm bound, which needs the others."""
        content = reply.content
        for key, kind in ((UPDATE_KEY, ArrayRecord), (METRICS_KEY, MetricRecord), (INFO_KEY, ConfigRecord)):
            if key not in content:
                raise Rejected(f"the reply has no '{key}' record")
            if not isinstance(content[key], kind):
                raise Rejected(f"the reply's '{key}' record is not a {kind.__name__}")
        info = content[INFO_KEY]
        if "client" in info and display_name(info["client"]) != owner.name:
            log.debug("  %s calls itself %r", owner.shown, display_name(info["client"]))
        if str(info.get("base_fingerprint", "")) != self.fp:
            raise Rejected("its base model differs from the federation's")
        try:
            factors = record_to_factors(content[UPDATE_KEY], self.config.transport)
        except Exception as err:  # anything a crafted record makes the decoding raise
            raise Rejected(f"the update cannot be read ({clean(err, 120)})") from None
        check_factors(factors, Expected(self.modules, self.config.lora.rank))
        # Under differential privacy owners report nothing but the update: losses and counts are not covered
        # by the noise. A reply that carries them anyway has them dropped here, never recorded.
        metrics = {} if self.config.privacy.enabled else check_metrics(dict(content[METRICS_KEY]))
        norms = module_norms(change(factors, memory))
        check_relative(norms, self.base_norms, self.server.max_relative_update)
        return Accepted(owner, reply.metadata.src_node_id, factors, metrics, total_norm(norms), message_bytes(reply))

    def screen(self, replies: list[Message], asked: dict[int, Owner], memory, unanswered: str = "no reply",
               memory_of: Callable[[int], object] | None = None) -> tuple[list[Accepted], list[dict], list[dict]]:
        """(accepted updates, rejected [{"owner", "key", "node", "reason"}], failed [the same, for
        error replies and owners that never answered, with ``unanswered`` as the reason]); every
        rejection and failure is logged. Each update is checked against ``memory``, what its owner
        was sent, or, with ``memory_of``, against ``memory_of(node)`` (routed: the owner's own LoRA)."""
        candidates: list[Accepted] = []
        rejected: list[dict] = []
        failed: list[dict] = []
        answered: set[int] = set()

        def entry(node: int, reason: str) -> dict:
            owner = asked.get(node)
            return {"owner": owner.name if owner else None, "key": owner.key if owner else None, "node": node,
                    "reason": reason}

        def refuse(node: int, reason: str) -> None:
            rejected.append(entry(node, reason))
            who = asked[node].shown if node in asked else f"node {node}"
            log.warning("  %s: update refused: %s", who, reason)

        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in asked:
                log.warning("  a reply from node %s, which was not asked, ignored", node)
                continue
            if node in answered:
                refuse(node, "a second reply in the same round")
                continue
            answered.add(node)
            if reply.has_error():
                reason = clean(reply.error.reason)
                failed.append(entry(node, reason))
                log.warning("  %s failed this round: %s", asked[node].shown, reason)
                continue
            try:
                candidates.append(self.check(reply, asked[node], memory_of(node) if memory_of else memory))
            except Rejected as err:
                refuse(node, clean(err))
        for node in asked:
            if node not in answered:
                failed.append(entry(node, unanswered))
                log.warning("  %s: %s", asked[node].shown, unanswered)
        bound = norm_bound(self.accepted_norms, [c.norm for c in candidates], self.server.update_norm_factor,
                           self.server.max_update_norm)
        accepted = []
        for c in candidates:
            try:
                check_norm(c.norm, bound)
            except Rejected as err:
                refuse(c.node, str(err))
                continue
            accepted.append(c)
        self.accepted_norms += [c.norm for c in accepted]
        return accepted, rejected, failed
