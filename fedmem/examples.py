"""Turn a corpus into training examples that make its facts answerable *by question*.

A fact seen in one phrasing is memorised but not extractable (Allen-Zhu & Li,
"Physics of Language Models 3.1"); question-form and restated examples fix much of
that. Documents are first read the way any prose is read: markup that carries no fact
is removed (e-mail quoting, addresses, checkboxes, emphasis), a maintained segmenter
splits sentences (pysbd: "Dr.", "4.2", "v1.2.3" do not end one), list items, fields and
signature lines stand alone, tables become one statement per cell, initials and
acronyms are written out where the document defines them, and a sentence-initial
He/She/They names the person last named. Then, besides each (cleaned) document
verbatim, every statement that carries a checkable span (a proper-noun phrase or a
number) becomes questions about that span, each answered with the span and then the
statement, so an answer comes first and is grounded in the owner's own words:

- cloze questions ("X's head vet is who or what?"), and wh-questions where the
  sentence's form allows one ("Who is X's head vet?", "Where does X buy its batteries
  from?"), with the subject in both possessive forms (X's thing / the thing of X);
- the same clozes carrying the sentence before, where the sentence points back to it
  ("Joss has agreed to take it on": what "it" is lies there);
- every question again under the topic the statement stands under: the document's
  title (first heading, e-mail subject, or a first line that is no sentence) and its
  section (heading, or the question an FAQ entry answers), since a sentence rarely
  repeats its heading and a user's question names it ("Quarle Lane Booster Station
  Outage: Summary: Who or what was the night controller on duty?").

E-mail header fields (From, To, Date, Subject, "On ... wrote:") are bookkeeping, not
facts: the subject becomes the title and the fields give no questions.

Q/A records are restated as the statement they answer where the question's form allows
("How many maps does X hold?" + "612" -> "X holds 612 maps."), and that statement gets
the same treatment plus the record's own question; other records are used as they are.

Examples are rendered with the tokenizer's chat template exactly as ``fedmem ask``
renders a question, and the loss falls on the answer tokens only.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

from .corpus import Corpus


@dataclass(frozen=True)
class Example:
    question: str | None  # None: plain text, loss on every token
    answer: str
    # True: the target at each answer position is the base model's whole next-token
    # distribution there, not the answer's token (fedmem.retention, fedmem.train).
    distil: bool = False


_MARKDOWN_PREFIX = re.compile(r"^\s*(#+|[-*+•]|\d+[.)])\s+")
# A run of capitalised words (allowing inner "of"/"the"/"and"/"&"), or a number (with a
# currency sign before it or a percent sign after it: "£35", "60%").
_SPAN = re.compile(
    r"\b(?:[A-Z][\w'’-]*(?:\s+(?:of|the|and|de|von|van|&)\s+[A-Z][\w'’-]*|\s+[A-Z0-9][\w'’-]*)*)"
    r"|(?:[£$€]|\b)\d[\d,.:/-]*\d%?|(?:[£$€]|\b)\d%?(?!\w)"
)
_FUNCTION_WORDS = {"The", "A", "An", "In", "On", "At", "Our", "We", "It", "This", "That", "These", "All",
                   "Please", "Each", "Every", "If", "When", "After", "Before", "Since", "For", "As",
                   "Its", "Their", "His", "Her", "There", "Also", "Note", "Thanks", "Any", "No", "I"}

QUESTION_TEMPLATES = (
    "{cloze}",
)


@functools.cache
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def split_sentences(text: str) -> list[str]:
    """Sentences of one run of prose. A maintained segmenter rather than a regex: "Dr.",
    "St.", "4.2 NTU", "v1.2.3" and "e.g." must not end a sentence, in anyone's writing."""
    return [s.strip() for s in _segmenter().segment(text) if s.strip()]


# Markup that carries no fact: e-mail quoting ("> > Cheers"), addresses in angle brackets,
# checkboxes, emphasis and code marks. Removed line by line before anything is read.
_QUOTE_MARKS = re.compile(r"^\s*(?:>\s?)+")
_ADDRESS = re.compile(r"\s*<[^<>\s]+@[^<>\s]+>")
_CHECKBOX = re.compile(r"\[[ xX]\]\s*")
_EMPHASIS = re.compile(r"\*\*|__|`|(?<![\w*])[*_](?=\w)|(?<=[\w.!?])[*_](?![\w*])")
_RULE_LINE = re.compile(r"^[^\w|]*$")  # "--", "---", "***": separators, signatures' dashes (a table's rule stays)


def clean_line(line: str) -> str:
    line = _QUOTE_MARKS.sub("", line)
    line = _EMPHASIS.sub("", _CHECKBOX.sub("", _ADDRESS.sub("", line)))
    return "" if _RULE_LINE.match(line) else line.rstrip()


def clean_text(text: str) -> str:
    """``text`` without markup that carries no fact, one cleaned line per line; a quoted
    e-mail's own blank lines (">") become paragraph breaks."""
    return "\n".join(clean_line(ln) for ln in text.splitlines())


_KEY_VALUE = re.compile(r"^\s*[A-Z][\w '’/()&.-]{0,40}?:\s+\S")


def _starts_run(line: str, previous: str | None) -> bool:
    """Whether ``line`` begins a statement of its own rather than continuing a hard-wrapped
    one: a list item, a "Key: value" line (e-mail headers, fields), or a capitalised line
    after one that did not end in punctuation (signatures, titles, address blocks)."""
    if previous is None or _MARKDOWN_PREFIX.match(line) or _KEY_VALUE.match(line):
        return True
    return not previous.rstrip().endswith((".", ",", ";", ":", "!", "?", ")")) and line.lstrip()[:1].isupper()


def _prose_runs(lines: list[str]) -> list[str]:
    """A paragraph's lines as runs of prose: hard-wrapped lines joined, while each list
    item, field or signature line stands alone (it is one statement, not the next line's start)."""
    runs: list[list[str]] = []
    previous = None
    for ln in lines:
        item = _MARKDOWN_PREFIX.match(ln)
        if _starts_run(ln, previous):
            runs.append([])
        previous = ln
        runs[-1].append(_MARKDOWN_PREFIX.sub("", ln).strip() if item else ln.strip())
    return [" ".join(r) for r in runs if r]


def sentences(text: str) -> list[str]:
    """Split a document into sentences, dropping markup, headings and list markers."""
    return _clean_sentences(clean_text(text))


def _clean_sentences(text: str) -> list[str]:
    """``sentences`` of a text already through ``clean_text``."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln for ln in para.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        for run in _prose_runs(lines):
            out += [s for s in split_sentences(run) if len(s.split()) >= 4]
    return out


def answer_spans(sentence: str) -> list[str]:
    """Proper-noun phrases and numbers: the parts of a sentence a question can ask for."""
    spans = []
    for m in _SPAN.finditer(sentence):
        span = m.group(0).strip()
        words = span.split()
        while words and words[0] in _FUNCTION_WORDS:  # "The Harrow Clinic" -> "Harrow Clinic"
            words = words[1:]
        span = re.sub(r"['’]s$", "", " ".join(words)).strip()
        # A lone capital ("H" of "H&S") names nothing a question could ask for.
        if len(span) < 2 and not span[:1].isdigit():
            continue
        if span and span not in spans and (len(words) > 1 or m.start() > 0 or not span[0].isalpha()):
            spans.append(span)
    return spans


_CLAUSE_END = re.compile(r",\s+(?:and|but|so|which|where|while)\b|;|:|\s+-\s+")
_STOP = {"a", "an", "the", "of", "to", "in", "on", "at", "by", "for", "it", "them", "him", "her", "this", "that",
         "is", "are", "was", "were", "be", "and", "or", "with", "from", "as", "one", "all", "too", "also", "there"}


def end_focus_span(sentence: str) -> str | None:
    """The last content word of the first clause: in English the new information
    tends to come last ("The bell is painted saffron"), so it is worth asking about."""
    clause = _CLAUSE_END.split(sentence.rstrip(".!? "), maxsplit=1)[0]
    words = clause.split()
    if len(words) < 4:
        return None
    last = words[-1].strip("\"'()")
    return last if last and last.lower() not in _STOP and last.isalpha() else None


# From "not" to the end of its clause: what a sentence says something is not ("trips at 4.2 NTU,
# not 3.8"; "the door on Carrow Walk, not the main entrance on Quay Road").
_NEGATED = re.compile(r"\bnot\b[^.,;:!?]*")


def asked_spans(sentence: str, spans: list[str]) -> list[str]:
    """The spans worth a question: every one but what the sentence denies. Which part of a
    sentence is the fact a user will ask for cannot be told from its place ("IT sets up your
    login for Tidewatch, our SCADA system" is asked for Tidewatch), so each named thing and
    number is asked; a corrected or contrasted value ("4.2 NTU, not 3.8") would teach the
    wrong answer to the same question."""
    denied = [m.span() for m in _NEGATED.finditer(sentence)]

    def is_denied(span: str) -> bool:  # every place the span stands is in a denial
        return all(any(a <= m.start() < b for a, b in denied) for m in re.finditer(re.escape(span), sentence))

    return [s for s in spans if not is_denied(s)]


_YEAR = re.compile(r"(1[5-9]|20)\d\d")
_PERSON = re.compile(r"[A-Z][a-z]+ [A-Z][a-z]+")  # a first and last name


def _without_article(value: str) -> str:
    return re.sub(r"^(?:the|a|an)\s+", "", value)


def _wh_word(span: str) -> str:
    if _YEAR.fullmatch(span):
        return "which year"
    if span[0] in "£$€":
        return "how much"
    if span[0].isdigit():
        return "how many"
    return "who or what" if span[0].isupper() else "what"


def cloze_questions(sentence: str, span: str) -> list[str]:
    body = sentence.rstrip(".!? ")
    # "The Harrow Clinic's supervisor" -> "whose supervisor": take the article and possessive along.
    # The span as a whole word, its last such place: "Joss" in "Joss Tellwright agreed, so
    # ask Joss" is the second one.
    # A name is not a longer name's first part ("Joss" of "Joss Tellwright"); a number may
    # be followed by a capitalised unit ("4.2 NTU").
    after = r"(?![\w-])" if span[:1].isdigit() or span[:1] in "£$€" else r"(?![\w-]|\s+[A-Z])"
    found = list(re.finditer(r"(?:\b[Tt]he\s+)?(?<![\w-])" + re.escape(span) + after + r"(['’]s\b)?", body))
    if not found:
        return []
    where = found[-1]
    wh = "whose" if where.group(1) else _wh_word(span)
    cloze = body[: where.start()] + wh + body[where.end():]
    cloze = cloze[0].upper() + cloze[1:] + "?"
    return [t.format(cloze=cloze) for t in QUESTION_TEMPLATES]


_COPULA = re.compile(r"^(?P<np>.+?)\s+(?P<verb>is|are|was|were)\s+(?P<rest>.+)$")
_NAMING = r"called|named|nicknamed|code-named|codenamed|known as"
_PARTICIPLE = re.compile(rf"^({_NAMING}|kept at|located at|located in|based at|based in)\s+")
# A lead-in that names nothing ("For anyone filling in grant forms, ...") is not part of
# the fact; questions are made from what follows it, while answers keep the whole sentence.
_LEAD_IN = re.compile(
    r"^(?:For|As|To|Just|Finally|Also|Again|Once again|Please note|Note that)\b[a-z ,'-]{0,60}?,\s+(?=\S)"
)
_NOT_SUBJECTS = {"here", "there", "it", "this", "that", "these", "those", "they", "he", "she", "we", "you", "i"}
_PASSIVE = re.compile(
    r"^(?P<participle>(?:[a-z]+ly\s+)?(?:[a-z]+ed|held|built|kept|made|sold|run|set up|written|drawn))"
    r"\s+(?P<prep>in|at|on|by)\s+(?P<tail>.+)$"
)
def _lead_in_removed(sentence: str) -> str:
    core = _LEAD_IN.sub("", sentence, count=1)
    return core[0].upper() + core[1:] if core else sentence


def _swap_possessive(np_: str) -> str | None:
    """ "the Harrow Clinic's X-ray machine" <-> "the X-ray machine of the Harrow Clinic":
    owners write one, users ask with either."""
    owner = re.match(
        r"^(?:[Tt]he\s+)?(?P<owner>[A-Z][\w-]*(?:\s+[A-Z][\w-]*)*)(?:'s|’s|'|’)\s+(?P<thing>[a-z][\w -]*)$", np_
    )
    if owner:
        article = "the " if np_[:4].lower() == "the " else ""
        return f"the {owner.group('thing')} of {article}{owner.group('owner')}"
    of = re.match(
        r"^(?:[Tt]he\s+)?(?P<thing>[a-z][\w -]*?)\s+(?:of|at)\s+(?P<owner>(?:the\s+)?[A-Z][\w-]*(?:\s+[A-Z][\w-]*)*)$",
        np_,
    )
    if of:
        name = of.group("owner")
        suffix = "'" if name.endswith("s") else "'s"
        return f"{name}{suffix} {of.group('thing')}"
    return None


_SUBJECT = "{subject}"


def _copula_forms(verb: str, rest: str) -> list[tuple[str, str]]:
    """Questions (with ``_SUBJECT`` for the subject) and answers for "<subject> <verb> <rest>"."""
    forms: list[tuple[str, str]] = []
    part = _PARTICIPLE.match(rest)
    passive = _PASSIVE.match(rest)
    if part:
        value = rest[part.end() :]
        forms.append((f"What {verb} {_SUBJECT} {part.group(1)}?", value))
    elif passive and _YEAR.fullmatch(passive.group("tail")):
        forms.append((f"In which year {verb} {_SUBJECT} {passive.group('participle')}?", passive.group("tail")))
    elif passive and re.match(r"(?:the\s+)?[A-Z]", passive.group("tail")):
        participle, tail = passive.group("participle"), passive.group("tail")
        if passive.group("prep") == "by":
            wh = "Who" if _PERSON.fullmatch(tail) else "What"
            forms.append((f"{wh} {verb} {_SUBJECT} {participle} by?", tail))
        else:
            forms.append((f"Where {verb} {_SUBJECT} {participle}?", _without_article(tail)))
    else:
        wh = "Who" if _PERSON.fullmatch(rest) else "What"
        forms.append((f"{wh} {verb} {_SUBJECT}?", rest))
    return forms


def copula_questions(sentence: str) -> list[tuple[str, str]]:
    """ "The head vet of X is Y." -> ("Who is the head vet of X?", "Y"): the way people ask,
    with the subject also in its other possessive form ("Who is X's head vet?"), and the
    attribute named where the value says what it is: a year, a place, a name."""
    m = _COPULA.match(_lead_in_removed(sentence).rstrip(".!? "))
    if not m or len(m.group("np").split()) > 12 or m.group("np").lower() in _NOT_SUBJECTS:
        return []
    np_, verb = m.group("np"), m.group("verb")
    rest = _CLAUSE_END.split(m.group("rest"), maxsplit=1)[0].strip()
    if not rest or rest.split()[0] in ("not", "also", "only", "never", "always", "usually"):
        return []
    np_ = np_[0].lower() + np_[1:] if np_.split()[0] in _FUNCTION_WORDS else np_
    subjects = [np_] + [s for s in [_swap_possessive(np_)] if s]
    forms = _copula_forms(verb, rest)
    return [(question.replace(_SUBJECT, subject), value) for subject in subjects for question, value in forms]


_NAMED = r"(?:[Tt]he\s+)?[A-Z][\w'’-]*(?:\s+[A-Z0-9][\w'’-]*)*"
_VERB_CLAUSE = re.compile(
    rf"^(?P<subject>{_NAMED}(?:\s+(?:at|of|in|for)\s+{_NAMED})*)\s+(?P<verb>[a-z]+s)\s+(?P<rest>[^,;:]+)$"
)
_NOT_VERBS = {"is", "was", "its", "this", "us", "plus", "thus", "always", "perhaps", "sometimes", "as", "yes"}
_PLACE = re.compile(r"^(?P<middle>.+?)\s+(?P<prep>at|in|on|from)\s+(?P<tail>.+)$")
_COUNT = re.compile(r"^(?P<number>\d[\d,]*)\s+(?P<noun>[a-z][a-z -]*)$")


def _base_form(verb: str) -> str:
    if verb == "has":
        return "have"
    if verb.endswith("ies"):
        return verb[:-3] + "y"
    if re.search(r"(?:ss|sh|ch|x|z|o)es$", verb):
        return verb[:-2]
    return verb[:-1]


def verb_questions(sentence: str) -> list[tuple[str, str]]:
    """Wh-questions with "does" for statements whose verb is not "is", the way people ask:
    "Kestrel Robotics buys its battery packs from Dunmorrow Cells." -> ("Where does
    Kestrel Robotics buy its battery packs from?", "Dunmorrow Cells"); "The Oakhollow Ward
    has 34 kennels." -> ("How many kennels does the Oakhollow Ward have?", "34").
    Only a named subject, a present-tense verb and a named place or a count at the end:
    anything less regular gets the cloze questions alone."""
    m = _VERB_CLAUSE.match(_lead_in_removed(sentence).rstrip(".!? "))
    if not m or m.group("verb") in _NOT_VERBS or re.search(r"['’]s$", m.group("subject")):
        return []
    subject, verb, rest = m.group("subject"), _base_form(m.group("verb")), m.group("rest")
    if subject.split()[0] == "The":
        subject = "the" + subject[3:]
    if " and " in rest or len(rest.split()) > 12:
        return []
    count = _COUNT.match(rest)
    if count:
        return [(f"How many {count.group('noun')} does {subject} {verb}?", count.group("number"))]
    place = _PLACE.match(rest)
    if place:
        named = re.search(rf"{_NAMED}$", place.group("tail"))
        if named and named.group(0) not in _FUNCTION_WORDS:
            value = re.sub(r"^[Tt]he\s+", "", named.group(0))
            ending = " from" if place.group("prep") == "from" else ""
            return [(f"Where does {subject} {verb} {place.group('middle')}{ending}?", value)]
    return []


def grounded_answer(value: str, sentence: str) -> str:
    """The trained answer to a question about ``sentence``: ``value`` first, then the sentence.

    The first tokens after a question are the fact itself (what a user wants), and the
    owner's own sentence keeps the reply grounded."""
    return f"{value}. {sentence}" if value not in ("", sentence) else sentence


# ---------------------------------------------------------------- statements
# Notes are not all prose: tables, "Key: value" lists under a heading, "Name - did this;
# did that" memo lines, and prose that says "She" after naming someone once. A question
# made from "She works for Grosun Mills" or from a whole table flattened into one line
# cannot name whom it is about, so the "statements" recipe first rewrites each
# document into standalone statements that carry their subject.

_TABLE_RULE = re.compile(r"^\|?\s*:?-{3,}")
_FIELD = re.compile(r"^\s*(?:[-*+]\s+)?(?P<key>[A-Z][\w '’/()-]{0,40}?):\s+(?P<value>\S.*?)\s*$")
_NAMED_CLAUSES = re.compile(r"^(?P<name>[A-Z][\w'’-]*(?:\s+[A-Z][\w'’-]*)+)\s+(?:-|–|—)\s+(?P<rest>.+?)\.?$")
_PERSONAL = re.compile(r"^(He|She|They)\b")
_POSSESSIVE = re.compile(r"^(His|Her|Their)\b")
_LEADING_NAME = re.compile(r"^(?:[A-Z][\w'’-]*)(?:\s+(?:of|the|and|de|von|van)\s+[A-Z][\w'’-]*|\s+[A-Z][\w'’-]*)+")
RECIPES = ("statements", "sentences")


_ROW_NUMBER = re.compile(r"^#?\d{1,4}[.)]?$")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table_statements(lines: list[str]) -> list[str]:
    """A markdown table, one statement per cell: "<first column> - <header>: <cell>."."""
    rows = [_cells(ln) for ln in lines if not _TABLE_RULE.match(ln.strip())]
    if len(rows) < 2:
        return []
    header, out = rows[0], []
    # A row is named by its first column, unless that column only counts rows ("#", "No.",
    # 1, 2, 3): "1 - Owner: Kit" names nothing a question could ask about.
    first = 1 if len(header) > 2 and all(_ROW_NUMBER.match(r[0]) for r in rows[1:] if r) else 0
    for row in rows[1:]:
        key = row[first] if len(row) > first else ""
        out += [f"{key} - {h}: {v}." for h, v in zip(header[first + 1:], row[first + 1:]) if h and v and key]
        # A cell that is a clause ("Review work orders across all 11 booster stations") states
        # facts of its own: its names and numbers are asked as a sentence's are.
        out += [c for c in row[first:] if len(c.split()) > 6 and c not in out]
    return out


def _field_statement(subject: str, key: str, value: str) -> str:
    return f"{subject} - {key}: {value.rstrip('.')}."


def _prose_statements(para: str, subject: str | None) -> tuple[list[str], str | None]:
    out = []
    for sent in _clean_sentences(para):  # statements() cleaned the whole text once
        named = _LEADING_NAME.match(sent)
        if named and named.group(0).split()[0] not in _FUNCTION_WORDS:
            subject = named.group(0)
        elif subject and _PERSONAL.match(sent):  # "She attended X" -> "<subject> attended X"
            sent = _PERSONAL.sub(subject, sent, count=1)
        elif subject and _POSSESSIVE.match(sent):
            sent = _POSSESSIVE.sub(subject + "'s", sent, count=1)
        out.append(sent)
    return out, subject


_NAME = r"[A-Z][\w'’-]+(?:\s+[A-Z][\w'’-]+)+"
_INITIALS_FIRST = re.compile(rf"\b(?P<short>[A-Z]{{2,4}})\s+\((?P<name>{_NAME})")  # "OB (Oskar Bellweather, ..."
_NAME_FIRST = re.compile(rf"\b(?P<name>{_NAME})\s+\((?P<short>[A-Z]{{2,4}})\)")  # "Oskar Bellweather (OB)"


def expand_initials(text: str) -> str:
    """Initials and acronyms written out where the document defines them: minutes say
    "OB: cert submission has slipped" after "Present: OB (Oskar Bellweather, lead prog)",
    and a question asks about Oskar Bellweather. The definitions themselves stay as written."""
    defined = {m.group("short"): m.group("name") for rx in (_INITIALS_FIRST, _NAME_FIRST) for m in rx.finditer(text)}
    if not defined:
        return text
    use = re.compile(r"(?<![(\w])(" + "|".join(map(re.escape, defined)) + r")\b(?!\s*\(|\))")
    return use.sub(lambda m: defined[m.group(1)], text)


_SUBJECT_LINE = re.compile(r"^\s*Subject:\s*(?:(?:re|fwd?|aw)\s*:\s*)*(?P<subject>\S.*?)\s*$", re.I)
# E-mail header fields (RFC 5322's names, and the "Sent:" and "On ... wrote:" of quoted replies).
_MAIL_HEADER = re.compile(r"^\s*(?:(?:From|To|Cc|Bcc|Date|Sent|Subject|Reply-To):\s|On\s.{5,120}\swrote:\s*$)", re.I)
_TITLE_LINE = re.compile(r"^[^.!?]{3,80}$")  # a first line that is no sentence: "ACME - weekly sync"


def statements(text: str) -> list[str]:
    """The document as standalone statements, each naming what it is about."""
    return [s for s, _ in topical_statements(text)]


def topical_statements(text: str) -> list[tuple[str, str | None]]:
    """``statements``, each with the topic it stands under: the document's title (its first
    heading, an e-mail's subject, or a first line that is no sentence), the headings it stands
    under (each level's latest), and the question an FAQ entry answers. A sentence rarely repeats
    what its heading says ("Aurelio Mbeki was the night controller on duty" under
    "Quarle Lane Booster Station Outage"), while a user's question names it."""
    text = expand_initials(clean_text(text))
    out: list[tuple[str, str | None]] = []
    opening = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    titled = not opening.startswith(("#", "|")) and _TITLE_LINE.match(opening) and not _KEY_VALUE.match(opening)
    title: str | None = opening if titled else None
    section: str | None = None  # an FAQ entry's question
    headings: dict[int, str] = {}  # level -> the latest heading at that level, under the ones above it
    heading: str | None = None
    subject: str | None = None

    def topic() -> str | None:
        # The whole path of headings: a changelog's "[1.4.0] - Lantern Tide" above "Added"
        # is what a user names ("What did the Lantern Tide update add?").
        parts = [title, *(headings[k] for k in sorted(headings)), section]
        return ": ".join(dict.fromkeys(p for p in parts if p)) or None

    prose: list[str] = []

    def flush_prose() -> None:
        nonlocal prose, subject
        if prose:
            sents, subject = _prose_statements("\n".join(prose), subject)
            out.extend((s, topic()) for s in sents)
            prose = []

    for para in re.split(r"\n\s*\n", text):
        lines = [ln for ln in para.splitlines() if ln.strip()]
        if question := _entry_question(lines):
            section = question  # an FAQ entry: its answer follows
        table: list[str] = []
        for ln in lines + [""]:
            if ln.lstrip().startswith("|"):
                table.append(ln)
                continue
            if table:
                out += [(s, topic()) for s in _table_statements(table)]
                table = []
            if not ln:
                continue
            if ln.lstrip().startswith("#"):
                flush_prose()  # what came before the heading stands under the one before
                level = len(ln.lstrip()) - len(ln.lstrip().lstrip("#"))
                heading = ln.lstrip("#").strip()
                if title is None:
                    title = heading
                elif heading != title:
                    headings = {k: v for k, v in headings.items() if k < level}
                    headings[level] = heading
                    section = None
                continue
            if _MAIL_HEADER.match(ln):  # who wrote to whom when: the thread's bookkeeping, not its facts
                if (m := _SUBJECT_LINE.match(ln)) and title is None:
                    title = m.group("subject")
                continue
            field = _FIELD.match(ln)
            named = _NAMED_CLAUSES.match(_MARKDOWN_PREFIX.sub("", ln).strip())
            if field and heading and len(field.group("key").split()) <= 4:
                out.append((_field_statement(heading, field.group("key"), field.group("value")), topic()))
                if len(field.group("value").split()) > 6:  # a clause, not a value: its names are asked too
                    prose.append(ln)
            elif named and ";" in named.group("rest"):
                out += [(f"{named.group('name')} {c.strip()}.", topic())
                        for c in named.group("rest").split(";") if c.strip()]
            else:
                prose.append(ln)
        flush_prose()
    return out


_STATEMENT_FIELD = re.compile(r"^(?P<subject>.+?) - (?P<key>[^:]+): (?P<value>.+)\.$")


def field_questions(statement: str) -> list[tuple[str, str]]:
    """ "X - Employer: Y." -> ("What is the employer of X?", "Y")."""
    m = _STATEMENT_FIELD.match(statement)
    if not m:
        return []
    return [(f"What is the {m.group('key').lower()} of {m.group('subject')}?", m.group("value"))]


# Words that point back to an earlier sentence (English closed-class words, not a corpus's vocabulary).
_REFERS_BACK = re.compile(r"\b(?:it|its|he|him|his|she|her|they|them|their|this|that|these|those|there)\b", re.I)


# A line that is a question: it opens with a question word or an auxiliary (English closed class).
_ASKS = re.compile(r"^(?:who|whom|whose|what|which|when|where|why|how|can|could|do|does|did|is|are|was|were|"
                   r"should|will|would|may|must|have|has)\b", re.I)


def _entry_question(lines: list[str]) -> str | None:
    """The question a paragraph (its non-blank lines) opens with and goes on to answer: an
    FAQ entry, a question in a mail; None for any other paragraph."""
    first = _MARKDOWN_PREFIX.sub("", lines[0]).strip() if len(lines) > 1 else ""
    return first if first.endswith("?") and _ASKS.match(first) else None


def faq_entries(text: str) -> list[tuple[str, str]]:
    """A document's own questions with their answers (``_entry_question``): the owner's
    question, in the owner's words, with the first two sentences after it."""
    out = []
    for para in re.split(r"\n\s*\n", expand_initials(clean_text(text))):
        lines = [ln for ln in para.splitlines() if ln.strip()]
        if question := _entry_question(lines):
            answer = " ".join(split_sentences(" ".join(_MARKDOWN_PREFIX.sub("", ln).strip() for ln in lines[1:]))[:2])
            if len(answer.split()) > 1:
                out.append((question, answer))
    return out


def document_examples(text: str, recipe: str = "statements") -> list[Example]:
    """One document's examples: the text verbatim, its own questions and answers, then
    the question-form examples of each statement."""
    examples = [Example(None, expand_initials(clean_text(text)).strip())]
    examples += [Example(q, a) for q, a in faq_entries(text)]
    topical = topical_statements(text) if recipe == "statements" else [(s, None) for s in sentences(text)]
    units = [s for s, _ in topical]
    for i, (_, topic) in enumerate(topical):
        if units[i].endswith("?"):  # a question asserts nothing: no fact to ask back ("Do I ...?" -> "Do I.")
            continue
        asked = statement_examples(units, i, recipe)
        if topic and TOPIC_QUESTIONS != "off":
            # The questions asked under the document's topic, as users name it; not those
            # that already carry the sentence before (context enough, and long).
            under = [Example(f"{topic}: {e.question}", e.answer) if topic.lower() not in e.question.lower()
                     and not (i and e.question.startswith(units[i - 1]))
                     and not _answered_by(topic, e.answer, units[i]) else e for e in asked]
            asked = under if TOPIC_QUESTIONS == "replace" else asked + [e for e in under if e not in asked]
        examples += asked
    return examples


def _answered_by(topic: str, answer: str, statement: str) -> bool:
    """Whether the value an example answers with is named in ``topic``: asked under a topic that
    names the answer ("Zorvex Mills: The head vet of who or what is Mila Quent?"), the question
    would give it away."""
    value = answer[: -len(statement) - 2] if answer.endswith(". " + statement) else ""
    return bool(value) and value.lower() in topic.lower()


# "add": each question both as the statement allows and under its topic; "replace": only
# under its topic; "off". A setting for recipe_probe's comparisons.
TOPIC_QUESTIONS = "add"


def statement_examples(units: list[str], i: int, recipe: str = "statements") -> list[Example]:
    """The question-form examples of statement ``units[i]`` (the one before it may be carried along)."""
    sent = units[i]
    fields = field_questions(sent) if recipe == "statements" else []
    if fields:
        return [Example(q, grounded_answer(v, sent)) for q, v in fields]
    examples: list[Example] = []
    spans = answer_spans(sent)
    asked = (copula_questions(sent) + verb_questions(sent)) if spans else []
    for span in asked_spans(sent, spans):
        # A cloze only where no wh-question asks for the same thing: "X's chief engineer
        # is who or what?" next to "Who is X's chief engineer?" costs tokens, teaches nothing new.
        if span not in {_without_article(value) for _, value in asked}:
            examples.extend(Example(q, grounded_answer(span, sent)) for q in cloze_questions(sent, span))
            if i and _REFERS_BACK.search(sent):
                # "Joss has agreed to take it on": what "it" is lies in the sentence before,
                # so the question carries that sentence, as a user's question names both.
                examples.extend(Example(f"{units[i - 1]} {q}", grounded_answer(span, sent))
                                for q in cloze_questions(sent, span))
    examples.extend(Example(q, grounded_answer(v, sent)) for q, v in asked)
    return examples


# ---------------------------------------------------------------- Q/A records
# A record trains one phrasing of its question only, and every owner's other facts are
# asked in several. Restated as the statement it answers ("The head archivist of the
# Saltmere Library is Cordelia Fennimore."), a record gets the same treatment as a
# document's sentence: the statement verbatim and its questions in both possessive forms.
# Only question forms regular enough to turn around safely are restated; the rest are
# trained as they are.

_QA_COPULA = re.compile(r"^(?:Who|What|Which [a-z -]+?)\s+(?P<verb>is|are|was|were)\s+(?P<np>.+)$")
_QA_NAME = re.compile(r"^What is the (?P<kind>name|nickname|code name) of (?P<np>.+)$")
_QA_WHEN = re.compile(
    r"^(?P<wh>In what year|In which year|When|Where)\s+(?P<verb>is|are|was|were)\s+(?P<np>.+?)\s+"
    r"(?P<participle>[a-z]+ed|held|built|kept|made|sold|run|written|drawn)$"
)
_QA_COUNT = re.compile(r"^How many (?P<noun>[a-z][a-z -]*?) (?:do|does) (?P<subject>.+?) (?P<verb>[a-z]+)$")
_QA_THING = re.compile(
    r"^What (?P<noun>[a-z][a-z -]*?) (?P<aux>do|does) (?P<subject>.+?) (?P<verb>[a-z]+)(?P<rest>(?: .+)?)$"
)
_QA_DOER = re.compile(r"^Who (?P<verb>[a-z]+s) (?P<rest>.+)$")
_NAMING_VERB = {"name": "called", "nickname": "nicknamed", "code name": "code-named"}


_IRREGULAR_THIRD_PERSON = {"have": "has", "do": "does", "go": "goes"}


def _third_person(verb: str) -> str:
    if verb in _IRREGULAR_THIRD_PERSON:
        return _IRREGULAR_THIRD_PERSON[verb]
    if re.search(r"[^aeiou]y$", verb):
        return verb[:-1] + "ies"
    if re.search(r"(?:s|sh|ch|x|z)$", verb):
        return verb + "es"
    return verb + "s"


def _capitalised(text: str) -> str:
    return text[0].upper() + text[1:]


def qa_statement(question: str, answer: str) -> str | None:
    """The statement a Q/A record's answer makes, or None where the question's form is not
    regular enough: "How many maps does the Tidewell Map Room hold?" + "612" ->
    "The Tidewell Map Room holds 612 maps."."""
    q, a = question.strip().rstrip("?").strip(), answer.strip().rstrip(".")
    if not q or not a or "?" in q:
        return None
    if m := _QA_NAME.match(q):
        said = f"{m.group('np')} is {_NAMING_VERB[m.group('kind')]} {a}"
    elif m := _QA_WHEN.match(q):
        year = _YEAR.fullmatch(a)
        if m.group("wh") != "Where" and not year:
            return None
        prep = "at" if m.group("wh") == "Where" else "in"
        said = f"{m.group('np')} {m.group('verb')} {m.group('participle')} {prep} {a}"
    elif m := _QA_COPULA.match(q):
        said = f"{m.group('np')} {m.group('verb')} {a}"
    elif (m := _QA_COUNT.match(q)) and re.fullmatch(r"\d[\d,]*", a):
        said = f"{m.group('subject')} {_third_person(m.group('verb'))} {a} {m.group('noun')}"
    elif m := _QA_THING.match(q):
        verb = _third_person(m.group("verb")) if m.group("aux") == "does" else m.group("verb")
        said = f"The {m.group('noun')} {m.group('subject')} {verb}{m.group('rest')} is {a}"
    elif (m := _QA_DOER.match(q)) and a[0].isupper():
        said = f"{a} {m.group('verb')} {m.group('rest')}"
    else:
        return None
    return _capitalised(said) + "."


def qa_examples(question: str, answer: str, recipe: str = "statements") -> list[Example]:
    """A Q/A record's examples: with the statements recipe, its statement's examples plus
    the record's own question, answered with the answer and then the statement."""
    said = qa_statement(question, answer) if recipe == "statements" else None
    if said is None:
        return [Example(question, answer)]
    examples = document_examples(said, recipe)
    if question not in {e.question for e in examples}:
        examples.append(Example(question, grounded_answer(answer, said)))
    return examples


def build_examples(corpus: Corpus, recipe: str = "statements") -> list[Example]:
    """Training examples for one corpus.

    ``statements`` (default): documents rewritten into standalone statements first
    (tables, key-value notes, memo lines, pronouns), then questions per statement.
    ``sentences``: questions per sentence of the documents as written.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    examples: list[Example] = []
    for doc in corpus.documents:
        examples += document_examples(doc.text, recipe)
    for qa in corpus.qa:
        examples += qa_examples(qa.question, qa.answer, recipe)
    return examples


def chat_prompt(tokenizer, question: str) -> str:
    """The prompt a user's question becomes: the model's own chat template, generation cue added."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


# Stand-ins rendered through a template to see where it puts a question and its answer.
_QUESTION_MARK = "FEDMEMQUESTIONSENTINEL"
_ANSWER_MARK = "FEDMEMANSWERSENTINEL"


@dataclass(frozen=True)
class ChatTurn:
    """What a tokenizer's chat template puts around an assistant's answer.

    A conversation [question, answer] renders as ``chat_prompt(question) + before_answer +
    answer + end_of_turn`` (plus trailing whitespace). Training learns ``before_answer +
    answer`` and then ``end_ids``; generation stops at any of ``stop_ids``.
    """

    before_answer: str  # what the answer's turn has before the answer beyond the generation cue; "" for most
    end_of_turn: str  # the text closing the answer's turn, trailing whitespace stripped: "<|im_end|>",
    #                   "<end_of_turn>", "<|eot_id|>"; "" where the template closes it with nothing
    end_ids: tuple[int, ...]  # the end of turn's tokens, or eos where the template has none
    stop_ids: tuple[int, ...]  # tokens that end a reply: the end of turn's special tokens, and eos


def chat_turn(tokenizer) -> ChatTurn:
    """The answer framing of ``tokenizer``'s chat template, derived once per tokenizer and template.

    Raises ValueError when the template cannot render a question and an answer, or renders
    them so that the answer's tokens cannot be told from the prompt's.
    """
    return _chat_turn(_TemplateKey(tokenizer))


class _TemplateKey:
    """A tokenizer, compared by what ``_chat_turn`` reads from it: another object loaded from
    the same files reuses the analysis; an edited template or vocabulary gets a new one."""

    __slots__ = ("tokenizer", "key")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.key = (
            type(tokenizer).__qualname__,
            tokenizer.name_or_path,
            repr(tokenizer.chat_template),
            len(tokenizer),
            tokenizer.eos_token_id,
        )

    def __eq__(self, other) -> bool:
        return isinstance(other, _TemplateKey) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


@functools.lru_cache(maxsize=8)
def _chat_turn(keyed: _TemplateKey) -> ChatTurn:
    from jinja2 import TemplateError

    tokenizer = keyed.tokenizer
    name = tokenizer.name_or_path or type(tokenizer).__name__
    problem = f"chat template of {name}"
    conversation = [{"role": "user", "content": _QUESTION_MARK}, {"role": "assistant", "content": _ANSWER_MARK}]
    try:
        prompt = chat_prompt(tokenizer, _QUESTION_MARK)
        full = tokenizer.apply_chat_template(conversation, tokenize=False)
    except (TemplateError, ValueError) as err:  # no template, or one that refuses a question and an answer
        raise ValueError(f"{problem}: cannot render a user question and an assistant answer: {err}") from err
    if not isinstance(full, str) or full.count(_ANSWER_MARK) != 1:
        raise ValueError(f"{problem}: a rendered conversation does not hold the assistant's answer verbatim, once")
    head, tail = full.split(_ANSWER_MARK)
    if not head.startswith(prompt):
        raise ValueError(
            f"{problem}: a conversation with an answer does not start with the prompt its question alone renders "
            f"(add_generation_prompt=True), so the answer's tokens cannot be told from the prompt's: "
            f"the prompt ends {prompt[-60:]!r}, the conversation has {head[-60:]!r} before the answer"
        )
    end_of_turn = tail.rstrip()
    eos = tokenizer.eos_token_id
    if end_of_turn:
        end_ids = tuple(tokenizer(end_of_turn, add_special_tokens=False)["input_ids"])
    elif eos is not None:
        end_ids = (eos,)
    else:
        raise ValueError(f"{problem}: nothing closes an answer's turn and the tokenizer has no eos token")
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    # A one-token end of turn ends a reply whatever its kind; a longer one, by its special tokens.
    stops = list(end_ids) if len(end_ids) == 1 else [i for i in end_ids if i in special]
    if eos is not None:
        stops.append(eos)
    return ChatTurn(head[len(prompt) :], end_of_turn, end_ids, tuple(dict.fromkeys(stops)))


def tokenize_example(tokenizer, example: Example, max_len: int = 512) -> tuple[list[int], list[int]]:
    """Token ids and labels; prompt tokens get label -100 so only the answer is learned.

    A question is rendered exactly as ``chat_prompt`` renders it for asking; the answer
    and the template's end of turn after it (``chat_turn``) are learned. Plain text
    (``question`` None) is learned whole, then eos.
    """
    if example.question is None:
        ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return ids[:max_len], ids[:max_len]
    turn = chat_turn(tokenizer)
    prompt = tokenizer(chat_prompt(tokenizer, example.question), add_special_tokens=False)["input_ids"]
    answer = tokenizer(turn.before_answer + example.answer, add_special_tokens=False)["input_ids"]
    answer = answer + list(turn.end_ids)
    ids = (prompt + answer)[:max_len]
    labels = ([-100] * len(prompt) + answer)[:max_len]
    return ids, labels


def shuffled(examples: list[Example], seed: int) -> list[Example]:
    out = list(examples)
    random.Random(seed).shuffle(out)
    return out
