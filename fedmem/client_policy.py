"""An owner's limits on what the coordinator may make its machine do.

The coordinator decides the recipe (``FederationConfig``) and sends it with every round;
each owner decides its own machine (``NodeSettings``: device, base model, threads) and,
with ``ClientPolicy``, how far it follows the recipe: at most so many rounds and epochs,
at most such a learning rate, rank, batch or example length, no model directory named by
the coordinator, LoRA only on the base model's own linear layers. ``policy_problems`` is
the pure check; the ClientApp refuses to train on a recipe with any problem
(``PolicyRefused``, which Flower returns to the server as the reply's error). Nothing is
clamped: a memory is only ever trained with the settings the coordinator recorded.

``fedmem-client join`` writes the owner's policy into the SuperNode's node config
(``policy_node_config``); the ClientApp reads it back (``policy_from_node_config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from safetensors import safe_open

from .config import ALL_LINEAR, ClientPolicy, FederationConfig, from_flat, key_of, keys, to_flat

# (the policy's limit, the recipe's setting, its value in a recipe)
_LIMITS = (
    ("limit_rounds", "rounds", lambda c: c.rounds),
    ("limit_epochs", "epochs", lambda c: c.lora.epochs),
    ("limit_learning_rate", "learning-rate", lambda c: c.lora.learning_rate),
    ("limit_rank", "rank", lambda c: c.lora.rank),
    ("limit_alpha", "alpha", lambda c: c.lora.alpha),
    ("limit_batch_size", "batch-size", lambda c: c.lora.batch_size),
    ("limit_max_length", "max-length", lambda c: c.lora.max_length),
    ("limit_retention", "retention", lambda c: c.lora.retention),
)
# The generators a coordinator may ask for: none, or this owner's own base model. A path
# would name a model directory to load on this machine, chosen by someone else.
GENERATORS = ("", "base")


class PolicyRefused(ValueError):
    """The coordinator's recipe goes beyond this owner's limits; ``problems`` names each setting."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            "this owner's client policy refuses the coordinator's training settings: " + "; ".join(problems)
            + ". Nothing was trained. An owner who agrees raises its limit (fedmem-client join --limit-rounds, "
            "--limit-epochs, --limit-learning-rate, --allow-generator, --allow-routed, or --set limit-KEY=VALUE)"
        )


def base_linear_layers(base_dir: str | Path) -> set[str] | None:
    """Names of the linear layers in the base model's repeated blocks (``q_proj``, ...): the last
    name of every 2-D ``*.weight`` whose path has a block number, read from the safetensors
    headers (no weights loaded). None if the model has no safetensors files."""
    files = sorted(Path(base_dir).glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as fh:  # the header only; no tensor is read
            for tensor in fh.keys():
                parts = tensor.split(".")
                if (len(parts) >= 3 and parts[-1] == "weight" and any(p.isdigit() for p in parts[:-2])
                        and len(fh.get_slice(tensor).get_shape()) == 2):
                    names.add(parts[-2])
    return names


def policy_problems(config: FederationConfig, policy: ClientPolicy,
                    linear_layers: set[str] | None = None) -> list[str]:
    """Every setting of the recipe ``config`` beyond ``policy``, with its value and the limit;
    [] if the owner accepts it. ``linear_layers``: the base model's (``base_linear_layers``);
    None checks target modules against the default set, ``ALL_LINEAR``."""
    problems = []
    for limit, setting, value_of in _LIMITS:
        value, most = value_of(config), getattr(policy, limit)
        if value > most:
            problems.append(f"{setting} {value!r} is above this owner's {key_of(limit)} {most!r}")
    generator = config.lora.generator
    if generator not in GENERATORS:
        problems.append(f"generator {generator!r} refused: a coordinator may ask for '' (off) or 'base' (this "
                        "owner's own base model), never a model directory to load on this machine")
    elif generator == "base" and not policy.allow_generator:
        problems.append("generator 'base' refused: this owner's allow-generator is off")
    if config.schedule == "routed" and not policy.allow_routed:
        problems.append("schedule routed refused: this owner's allow-routed is off (its LoRA would reach every "
                        "holder of the memory on its own)")
    wanted, dp = policy.require_dp_epsilon, config.privacy
    if wanted > 0 and not (dp.enabled and dp.dp_epsilon <= wanted):
        problems.append(("dp-epsilon " + (f"{dp.dp_epsilon:g}" if dp.enabled else "0 (no differential privacy)")
                         + f" refused: this owner requires require-dp-epsilon {wanted:g} or less"))
    if policy.require_secure and not config.secure:
        problems.append("secure off refused: this owner requires secure aggregation (require-secure)")
    allowed = linear_layers or set(ALL_LINEAR)
    foreign = [m for m in config.lora.target_modules if m not in allowed]
    if foreign:
        problems.append(f"target-modules {', '.join(foreign)} refused: not among the linear layers of this owner's "
                        f"base model's blocks ({', '.join(sorted(allowed))})")
    return problems


def enforce_policy(config: FederationConfig, policy: ClientPolicy, base_dir: str | Path) -> None:
    """Raise ``PolicyRefused`` naming every setting of ``config`` beyond ``policy``."""
    problems = policy_problems(config, policy, base_linear_layers(base_dir))
    if problems:
        raise PolicyRefused(problems)


def policy_node_config(policy: ClientPolicy, changed_only: bool = False) -> dict[str, str]:
    """The policy as node-config entries (flat keys, string values) for the SuperNode; with
    ``changed_only``, only the limits that differ from the defaults (a deployed ClientApp takes
    the defaults for the others)."""
    def text(value) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    defaults = to_flat(ClientPolicy())
    return {k: text(v) for k, v in to_flat(policy).items() if not changed_only or v != defaults[k]}


def policy_from_node_config(node_config: Mapping) -> ClientPolicy | None:
    """The owner's policy from a SuperNode's node config: its ``limit-*``/``allow-*`` keys, the
    defaults for any missing, on every deployed node (one with ``data``). None in a simulation
    that sets none: there the user is the coordinator and every owner."""
    given = {k: node_config[k] for k in keys(ClientPolicy) if k in node_config}
    if not given and "data" not in node_config:
        return None
    return from_flat(ClientPolicy, given)
