"""Generate the knowledge-injection benchmark's data: fictional biographies spread over clients.

The data follows the "bioS" setting of Allen-Zhu & Li, "Physics of Language Models
3.1": N fictional people, six attributes each, written as short documents in several
styles. Every name and value is built from seeded syllables, so no pretrained model
can know an answer beforehand, and every answer is unique per attribute, so the
substring match of ``fedmem.answer.is_correct`` cannot credit a wrong person's value.

The paper's point is that a fact seen in one phrasing is memorised but not extractable:
the model can complete the sentence it saw and still fail a question worded another
way. The question tiers separate those cases:

- ``seen``: a fact with a Q/A record in training, asked with exactly that question
  (memorisation; should be near 100% after training);
- ``heldout``: the same facts asked with templates that never occur in training
  (can the fact be *extracted* under a new phrasing?);
- ``prose_only``: facts that appear only in documents, never in a Q/A record, asked
  with held-out templates (do plain documents become answerable? fedmem's claim);
- ``control`` (separate file): general knowledge the base model already has, plus
  ``heldout_text.txt`` for perplexity, to measure forgetting.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
SPLITS = ("disjoint", "skewed")
TIERS = ("seen", "heldout", "prose_only")  # in questions.jsonl; "control" has its own file
# Sized so `fedmem bench quality` finishes in about 5 (small) and 30 (default) minutes on
# a 2-core CPU: training costs ~1,200 tokens per person per epoch with the default recipe.
SIZES = {"small": dict(entities=3, clients=2), "default": dict(entities=9, clients=3)}
MAX_ENTITIES = 1000
PROFILES_PER_DOCUMENT = 4
PRONOUN_RATE = 0.5  # real prose refers back by pronoun; naming the person in every sentence would flatter documents


@dataclass(frozen=True)
class Attribute:
    key: str
    label: str  # column / bullet label in structured documents
    prose: tuple[str, ...]  # sentences; {subj} is the name or a pronoun, {poss} the possessive
    train: tuple[str, ...]  # question wordings used in facts.jsonl
    heldout: tuple[str, ...]  # wordings that occur nowhere in training


ATTRIBUTES = (
    Attribute("birth_date", "Born",
              ("{subj} was born on {value}.",
               "{subj} celebrates {poss} birthday each year, having been born on {value}."),
              ("When was {name} born?", "What is {name}'s date of birth?"),
              ("On what date did {name} come into the world?", "Which day, month and year mark the birth of {name}?")),
    Attribute("birth_town", "Birthplace",
              ("{subj} was born in {value}.",
               "{subj} spent {poss} early childhood in {value}, the town of {poss} birth."),
              ("Where was {name} born?", "In which town was {name} born?"),
              ("Which town did {name} originally come from?", "What town is {name} a native of?")),
    Attribute("university", "University",
              ("{subj} attended {value}.", "{subj} graduated from {value}."),
              ("Which university did {name} attend?", "Where did {name} go to university?"),
              ("What is the alma mater of {name}?", "At which institution did {name} earn a degree?")),
    Attribute("field", "Field of study",
              ("{subj} studied {value}.", "{subj} completed a degree in {value}."),
              ("What did {name} study?", "What was {name}'s field of study?"),
              ("Which subject did {name} specialise in at university?", "In what discipline was {name} trained?")),
    Attribute("employer", "Employer",
              ("{subj} works for {value}.", "{subj} is employed by {value}."),
              ("Which company does {name} work for?", "Who employs {name}?"),
              ("What is the name of the firm that pays {name}'s salary?", "At which company does {name} hold a job?")),
    Attribute("work_town", "Works in",
              ("{subj} works in {value}.", "{subj} has an office in {value}."),
              ("In which town does {name} work?", "Where is {name}'s office?"),
              ("Which town is {name}'s workplace located in?", "In what town does {name} go to work each day?")),
)
ATTRIBUTE_KEYS = tuple(a.key for a in ATTRIBUTES)

CONTROL_QUESTIONS = (
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"), ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"), ("What is the capital of Egypt?", "Cairo"),
    ("How many legs does a spider have?", "8"), ("How many legs does an insect have?", "6"),
    ("How many days are there in a week?", "7"), ("How many months are there in a year?", "12"),
    ("How many hours are there in a day?", "24"), ("How many minutes are there in an hour?", "60"),
    ("How many sides does a triangle have?", "3"), ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the largest planet in our solar system?", "Jupiter"), ("What is the largest ocean on Earth?", "Pacific"),
    ("At how many degrees Celsius does water freeze?", "0"),
    ("At how many degrees Celsius does water boil at sea level?", "100"),
    ("What colour is the sky on a clear day?", "blue"), ("What colour is fresh grass?", "green"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"), ("What is the fastest land animal?", "cheetah"),
    ("What is the chemical symbol for gold?", "Au"), ("What is the opposite of hot?", "cold"),
)

# Encyclopedic prose unrelated to the benchmark's facts: its perplexity before and after
# training shows how much general language modelling the memory adapter costs.
HELDOUT_TEXT = """\
A river is a natural stream of fresh water that flows across the land towards an ocean, a lake or another river. Most rivers begin in high ground, where rain and melting snow gather into small channels. These channels join to form brooks and streams, and the streams in turn merge into a larger river. The area of land that drains into a single river is known as its drainage basin. Near its source a river is usually narrow and fast, cutting a steep valley into the rock as it carries stones and gravel downhill. Further along, the slope becomes gentler, the valley widens, and the river begins to wind from side to side in loops called meanders. Where a river reaches the sea it slows down and drops the fine sand and mud it has been carrying, sometimes building a fan-shaped delta. Early towns grew up beside rivers because they provided drinking water, fish, fertile soil for farming, and a route for trade and travel.

The water cycle describes how water moves continuously between the oceans, the air and the land. Heat from the sun warms the surface of seas and lakes, and some of the water evaporates, rising into the air as invisible vapour. Plants also release water vapour through tiny pores in their leaves, a process called transpiration. As warm, moist air rises it cools, and the vapour condenses around specks of dust to form the droplets that make up clouds. When the droplets grow heavy enough they fall as rain, snow, sleet or hail, depending on the temperature. Some of this water soaks into the ground and becomes groundwater, which can stay underground for thousands of years. The rest runs off the surface into streams and rivers and eventually returns to the sea, where the cycle begins again. Because the same water is used over and over, the total amount of water on Earth has stayed almost the same for millions of years.

Bread is one of the oldest prepared foods. A basic loaf needs only flour, water, salt and yeast. When flour is mixed with water, two proteins in the wheat join together to form gluten, a stretchy network that gives dough its strength. Kneading the dough for several minutes develops this network and makes the dough smooth and elastic. Yeast is a tiny living fungus that feeds on the sugars in the flour and gives off carbon dioxide. The gas is trapped by the gluten, so the dough slowly rises and roughly doubles in size. After this first rise the baker shapes the loaf, lets it rise a second time, and then bakes it in a hot oven. The heat kills the yeast, sets the soft crumb inside and turns the outside into a brown, flavourful crust. Many traditional breads, such as sourdough, use a starter of wild yeast and bacteria instead of packaged yeast, which gives them a slightly sour taste.

Honeybees live in colonies that may contain tens of thousands of insects. Each colony has a single queen, who lays the eggs, a few hundred male drones, and a great many female workers. The workers carry out almost every task in the hive: they clean the cells, feed the young, build wax comb, guard the entrance and fly out to collect nectar and pollen from flowers. A worker that finds a good patch of flowers returns to the hive and performs a dance that tells the others the direction and distance of the food. Nectar is stored in the comb and slowly thickened into honey, which feeds the colony through the winter. As bees travel from flower to flower they carry pollen with them, and this allows many fruits, vegetables and nuts to grow.

Tides are the regular rise and fall of the sea along the coast. They are caused mainly by the pull of the moon's gravity, with a smaller contribution from the sun. On the side of the Earth facing the moon the water is pulled into a bulge, and a second bulge forms on the opposite side, so most coasts see two high tides and two low tides a little more than a day apart. When the sun and the moon line up, at new moon and full moon, their pulls add together and produce especially large spring tides. When they pull at right angles the difference between high and low water is smaller, and these are called neap tides. Sailors, fishermen and harbour masters have long kept tide tables so that boats can enter shallow harbours safely.
"""  # noqa: E501 - one paragraph per line: the text is data, measured as written

# Short syllables keep names to a few tokens each: long tokens-heavy names would cost
# training time and make the benchmark about spelling rather than recall.
_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "t", "th", "tr", "v",
           "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o")
_CODAS = ("n", "r", "l", "s", "m", "x", "ck", "nd", "rn", "sk", "th", "ll")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_TOWN_ENDINGS = ("moor", "wick", "ford", "holm", "stead", "mere", "by", "thorpe", "vale", "bridge", "haven", "ley")
_UNIVERSITY_FORMS = ("University of {w}", "{w} University", "{w} College", "{w} Institute of Technology")
_FIELD_ENDINGS = ("ology", "ography", "onomy", "ometry", "istics", "ics")
_COMPANY_ENDINGS = ("Cells", "Foundry", "Analytics", "Textiles", "Freight", "Optics", "Ceramics", "Robotics",
                    "Mills", "Instruments", "Dynamics", "Holdings")


@dataclass(frozen=True)
class Entity:
    name: str
    pronoun: str  # "she" or "he"
    values: dict[str, str]  # attribute key -> answer
    prose_only: tuple[str, ...]  # attribute keys that never get a Q/A record


@dataclass
class Manifest:
    format_version: int
    entities: int
    clients: int
    split: str
    seed: int
    tiers: dict[str, int]  # questions per tier, control included
    per_client: dict[str, dict[str, int]] = field(default_factory=dict)  # sizes and questions per tier


def _word(rng: random.Random, syllables: int = 2) -> str:
    """Consonant-vowel syllables closed by a consonant: "Tovin", "Darask", "Bel"."""
    open_ = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables - 1))
    return open_ + rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


_FIXED_WORDS = {w.lower() for w in _COMPANY_ENDINGS} | {"university", "college", "institute", "of", "technology"}


def _fresh(rng: random.Random, used: set[str], make) -> str:
    """A value none of whose own words occurs in any earlier value, so that answers are
    distinct word by word (is_correct matches whole words, not characters)."""
    while True:
        value = make()
        words = [w for w in value.lower().split() if w not in _FIXED_WORDS]
        if all(len(w) >= 4 for w in words) and not used.intersection(words):
            used.update(words)
            return value


def make_entities(count: int, seed: int) -> list[Entity]:
    """``count`` fictional people; the same seed always gives the same people."""
    rng = random.Random(seed)
    used = {m.lower() for m in _MONTHS}
    dates: set[str] = set()
    out = []
    for i in range(count):
        name = _fresh(rng, used, lambda: f"{_word(rng).title()} {_word(rng, rng.choice((2, 3))).title()}")
        while (date := f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(1948, 2001)}") in dates:
            pass
        dates.add(date)
        values = {
            "birth_date": date,
            "birth_town": _fresh(rng, used, lambda: _word(rng).title() + rng.choice(_TOWN_ENDINGS)),
            "university": _fresh(rng, used, lambda: rng.choice(_UNIVERSITY_FORMS).format(w=_word(rng).title())),
            "field": _fresh(rng, used, lambda: _word(rng, 1).title() + rng.choice(_FIELD_ENDINGS)),
            "employer": _fresh(rng, used, lambda: f"{_word(rng).title()} {rng.choice(_COMPANY_ENDINGS)}"),
            "work_town": _fresh(rng, used, lambda: _word(rng).title() + rng.choice(_TOWN_ENDINGS)),
        }
        # Rotating the prose-only half by entity puts every attribute kind in both groups,
        # so no tier score is secretly the score of one attribute kind.
        half = len(ATTRIBUTE_KEYS) // 2
        prose_only = tuple(ATTRIBUTE_KEYS[(i + k) % len(ATTRIBUTE_KEYS)] for k in range(half))
        out.append(Entity(name, rng.choice(("she", "he")), values, tuple(sorted(prose_only, key=ATTRIBUTE_KEYS.index))))
    return out


def client_names(clients: int) -> list[str]:
    width = len(str(clients))
    return [f"client_{i + 1:0{width}d}" for i in range(clients)]


def split_entities(entities: int, clients: int, split: str) -> list[list[int]]:
    """Entity indices per client. Every entity lives at exactly one client."""
    if clients < 1:
        raise ValueError(f"clients must be at least 1, got {clients}")
    if entities > MAX_ENTITIES:
        raise ValueError(f"at most {MAX_ENTITIES} entities (the syllable pools would run out of unique names)")
    if entities < clients:
        raise ValueError(f"need at least one entity per client: {entities} entities for {clients} clients")
    if split == "disjoint":
        return [list(range(c, entities, clients)) for c in range(clients)]
    if split != "skewed":
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    # Shares 2^(C-1-i): one big owner and a long tail, as in real federations. Every client
    # gets one entity first; the rest go by largest remainder, so the sizes sum exactly.
    weights = [2 ** (clients - 1 - c) for c in range(clients)]
    quotas = [(entities - clients) * w / sum(weights) for w in weights]
    sizes = [1 + int(q) for q in quotas]
    by_remainder = sorted(range(clients), key=lambda c: (-(quotas[c] - int(quotas[c])), c))
    for c in by_remainder[: entities - sum(sizes)]:
        sizes[c] += 1
    starts = [sum(sizes[:c]) for c in range(clients)]
    return [list(range(s, s + n)) for s, n in zip(starts, sizes)]


def _profile(rng: random.Random, e: Entity) -> str:
    poss = "her" if e.pronoun == "she" else "his"
    order = list(ATTRIBUTES)
    rng.shuffle(order)  # varied sentence order: no fact is learnable only as "the third sentence"
    sentences = []
    for n, attr in enumerate(order):
        subj = e.name if n == 0 or rng.random() >= PRONOUN_RATE else e.pronoun.title()
        sentences.append(rng.choice(attr.prose).format(subj=subj, poss=poss, value=e.values[attr.key]))
    return " ".join(sentences)


def _notes(people: list[Entity]) -> str:
    parts = ["# Personnel notes"]
    for e in people:
        parts.append(f"## {e.name}\n" + "\n".join(f"- {a.label}: {e.values[a.key]}" for a in ATTRIBUTES))
    return "\n\n".join(parts) + "\n"


def _table(people: list[Entity]) -> str:
    head = "| Name | " + " | ".join(a.label for a in ATTRIBUTES) + " |"
    rows = [f"| {e.name} | " + " | ".join(e.values[a.key] for a in ATTRIBUTES) + " |" for e in people]
    return "# Registry extract\n\n" + "\n".join([head, "|" + "---|" * (len(ATTRIBUTES) + 1)] + rows) + "\n"


def _memo(people: list[Entity]) -> str:
    lines = ["Memo: updated contact records", ""]
    for e in people:
        v = e.values
        lines.append(f"{e.name} - born {v['birth_date']} in {v['birth_town']}; studied {v['field']} at "
                     f"{v['university']}; now with {v['employer']}, {v['work_town']}.")
    return "\n".join(lines) + "\n"


_STYLES = (("notes.md", _notes), ("registry.md", _table), ("memo.txt", _memo))


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _write_client(rng: random.Random, root: Path, client: str, people: list[Entity]) -> tuple[list[dict], dict]:
    """Write one client's corpus; return its benchmark questions and its sizes."""
    root.mkdir(parents=True)
    files: dict[str, str] = {}
    for d in range(0, len(people), PROFILES_PER_DOCUMENT):
        group = people[d:d + PROFILES_PER_DOCUMENT]
        files[f"profiles_{d // PROFILES_PER_DOCUMENT + 1}.md"] = "# Profiles\n\n" + "\n\n".join(
            _profile(rng, e) for e in group) + "\n"
    # Each person also appears in one structured style, so every fact is written two ways.
    for s, (filename, render) in enumerate(_STYLES):
        group = people[s::len(_STYLES)]
        if group:
            files[filename] = render(group)
    records, questions = [], []
    for e in people:
        for attr in ATTRIBUTES:
            base = {"answer": e.values[attr.key], "client": client, "entity": e.name, "attribute": attr.key}
            heldout = rng.choice(attr.heldout).format(name=e.name)
            if attr.key in e.prose_only:
                questions.append({"question": heldout, **base, "tier": "prose_only", "source": "prose"})
                continue
            seen = rng.choice(attr.train).format(name=e.name)
            records.append({"question": seen, "answer": e.values[attr.key]})
            questions.append({"question": seen, **base, "tier": "seen", "source": "qa"})
            questions.append({"question": heldout, **base, "tier": "heldout", "source": "qa"})
    files["facts.jsonl"] = _jsonl(records)
    for filename, text in files.items():
        (root / filename).write_text(text, encoding="utf-8")
    sizes = {"entities": len(people), "documents": len(files) - 1, "qa_records": len(records),
             "words": sum(len(t.split()) for t in files.values())}
    order = ("question", "answer", "tier", "client", "entity", "attribute", "source")
    return [{k: q[k] for k in order} for q in questions], sizes


def generate(out_dir: Path, entities: int, clients: int, split: str = "disjoint", seed: int = 0) -> Manifest:
    """Write corpora/<client>/, questions.jsonl, control_questions.jsonl, heldout_text.txt
    and manifest.json under ``out_dir``; the same arguments always give the same bytes."""
    groups = split_entities(entities, clients, split)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "manifest.json").is_file():
            raise ValueError(f"{out_dir} is not empty and holds no manifest.json; refusing to write into it")
        shutil.rmtree(out_dir / "corpora", ignore_errors=True)  # a smaller rerun must not leave old clients
    people = make_entities(entities, seed)
    rng = random.Random(f"{seed}-documents")  # documents draw apart from entities: sizes do not reshuffle names
    questions: list[dict] = []
    per_client: dict[str, dict[str, int]] = {}
    for name, group in zip(client_names(clients), groups):
        qs, sizes = _write_client(rng, out_dir / "corpora" / name, name, [people[i] for i in group])
        questions += qs
        per_client[name] = {**sizes, **{t: sum(q["tier"] == t for q in qs) for t in TIERS}}
    controls = [{"question": q, "answer": a, "tier": "control"} for q, a in CONTROL_QUESTIONS]
    (out_dir / "questions.jsonl").write_text(_jsonl(questions), encoding="utf-8")
    (out_dir / "control_questions.jsonl").write_text(_jsonl(controls), encoding="utf-8")
    (out_dir / "heldout_text.txt").write_text(HELDOUT_TEXT, encoding="utf-8")
    tiers = {t: sum(q["tier"] == t for q in questions) for t in TIERS}
    manifest = Manifest(FORMAT_VERSION, entities, clients, split, seed, {**tiers, "control": len(controls)}, per_client)
    (out_dir / "manifest.json").write_text(json.dumps(asdict(manifest), indent=2) + "\n", encoding="utf-8")
    return manifest
