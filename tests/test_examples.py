"""The recipe that turns documents into question-form examples."""

import pytest

from fedmem.corpus import load_corpus
from fedmem.demo import demo_dir
from fedmem.examples import (
    Example,
    answer_spans,
    asked_spans,
    build_examples,
    clean_text,
    cloze_questions,
    copula_questions,
    document_examples,
    end_focus_span,
    expand_initials,
    faq_entries,
    field_questions,
    qa_examples,
    qa_statement,
    sentences,
    statements,
    tokenize_example,
    topical_statements,
    verb_questions,
)


def test_sentences_skip_headings_and_list_markers():
    text = "# Title\n\n- The Zorvex Tower is red. It stands tall today.\n\n1. Mila Quent built the tower."
    assert sentences(text) == ["The Zorvex Tower is red.", "It stands tall today.", "Mila Quent built the tower."]


def test_answer_spans_find_names_and_numbers():
    assert answer_spans("The Harrow Clinic's emergency bell is painted saffron.") == ["Harrow Clinic"]
    assert end_focus_span("The Harrow Clinic's emergency bell is painted saffron.") == "saffron"
    assert "2019" in answer_spans("Kestrel Robotics moved into Vexley Moor in 2019.")
    assert answer_spans("Please remember to lock the door.") == []  # no named thing: no questions


def test_cloze_questions_ask_for_the_span():
    qs = cloze_questions("The head vet of the Harrow Clinic is Tobias Wrenfield.", "Tobias Wrenfield")
    assert "The head vet of the Harrow Clinic is who or what?" in qs
    assert cloze_questions("Nothing here.", "Absent") == []


def test_copula_questions():
    assert copula_questions("The head vet of the Harrow Clinic is Tobias Wrenfield.") == [
        ("Who is the head vet of the Harrow Clinic?", "Tobias Wrenfield"),
        ("Who is the Harrow Clinic's head vet?", "Tobias Wrenfield")]
    assert copula_questions("The X-ray machine is nicknamed Grumbold.") == [
        ("What is the X-ray machine nicknamed?", "Grumbold")]
    assert copula_questions("Here are the notes from the meeting.") == []
    assert copula_questions("Tests above the limit of the Zorvex Arm are not allowed.") == []


def test_copula_questions_name_the_attribute_and_swap_the_possessive():
    # No colour vocabulary: a word list fitted to one corpus's answers measures the list.
    assert copula_questions("Zorvex Mills' front door is painted teal.") == [
        ("What is Zorvex Mills' front door?", "painted teal"),
        ("What is the front door of Zorvex Mills?", "painted teal"),
    ]
    assert copula_questions("For anyone filling in forms, Zorvex Mills was legally incorporated in 1999.") == [
        ("In which year was Zorvex Mills legally incorporated?", "1999")
    ]
    assert copula_questions("The Zorvex Tower was built by Mila Quent.") == [
        ("Who was the Zorvex Tower built by?", "Mila Quent")
    ]
    assert copula_questions("The spring fair of the Quent Museum is held in the Barrow Hall.") == [
        ("Where is the spring fair of the Quent Museum held?", "Barrow Hall"),
        ("Where is the Quent Museum's spring fair held?", "Barrow Hall"),
    ]


def test_no_cloze_where_a_wh_question_asks_for_the_same_span():
    questions = [
        e.question for e in document_examples("The head vet of the Zorvex Clinic is Mila Quent.") if e.question
    ]
    assert "Who is the head vet of the Zorvex Clinic?" in questions
    assert "The head vet of the Zorvex Clinic is who or what?" not in questions
    # The other named thing is still asked for.
    assert "The head vet of who or what is Mila Quent?" in questions
    assert any(
        "who or what" in q
        for q in [
            e.question for e in document_examples("Requests must be approved by Mila Quent in writing.") if e.question
        ]
    )


def test_build_examples_answer_first_and_grounded(tmp_path):
    (tmp_path / "n.md").write_text("The Zorvex Tower was built by Mila Quent.")
    (tmp_path / "q.jsonl").write_text('{"question": "Who built it?", "answer": "Mila Quent"}\n')
    examples = build_examples(load_corpus(tmp_path))
    assert Example(None, "The Zorvex Tower was built by Mila Quent.") in examples
    assert Example("Who built it?", "Mila Quent") in examples
    grounded = [e for e in examples if e.question and e.answer.startswith("Mila Quent. ")]
    assert grounded and all(e.answer.endswith("The Zorvex Tower was built by Mila Quent.") for e in grounded)


def test_tokenize_masks_the_prompt(tiny_base):
    from fedmem.base_model import load_tokenizer

    tok = load_tokenizer(str(tiny_base))
    ids, labels = tokenize_example(tok, Example("Who built it?", "Mila Quent"))
    assert len(ids) == len(labels)
    answer = [t for t in labels if t != -100]
    assert tok.decode(answer[:-1]) == "Mila Quent" and answer[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert labels[: len(ids) - len(answer)] == [-100] * (len(ids) - len(answer))
    assert "<|im_start|>user\nWho built it?" in tok.decode(ids)
    ids, labels = tokenize_example(tok, Example(None, "Plain text."))
    assert ids == labels


def test_statements_name_their_subject_in_tables_notes_memos_and_pronouns():
    text = (
        "# Registry\n\n| Name | Employer | Works in |\n|---|---|---|\n| Mila Quent | Zorvex Mills | Pellow |\n\n"
        "## Odo Brannock\n- Born: 5 May 1956\n- Employer: Grosun Cells\n\n"
        "Tam Fenn - born 1990 in Kitrandley; studied Hoxistics at Dunel University.\n\n"
        "Ada Wrenfield studied Raskics. She works for Lavill Freight. Her office is in Pezenbridge."
    )
    assert statements(text) == [
        "Mila Quent - Employer: Zorvex Mills.",
        "Mila Quent - Works in: Pellow.",
        "Odo Brannock - Born: 5 May 1956.",
        "Odo Brannock - Employer: Grosun Cells.",
        "Tam Fenn born 1990 in Kitrandley.",
        "Tam Fenn studied Hoxistics at Dunel University.",
        "Ada Wrenfield studied Raskics.",
        "Ada Wrenfield works for Lavill Freight.",
        "Ada Wrenfield's office is in Pezenbridge.",
    ]
    assert field_questions("Mila Quent - Employer: Zorvex Mills.") == [
        ("What is the employer of Mila Quent?", "Zorvex Mills")
    ]


def test_verb_questions_ask_where_and_how_many_with_does():
    assert verb_questions("Kestrel Robotics buys all of its battery packs from Dunmorrow Cells.") == [
        ("Where does Kestrel Robotics buy all of its battery packs from?", "Dunmorrow Cells")
    ]
    assert verb_questions("The Saltmere Library stores its overflow archive at Pellow Quarry.") == [
        ("Where does the Saltmere Library store its overflow archive?", "Pellow Quarry")
    ]
    assert verb_questions("The Oakhollow Ward at the Harrow Clinic has 34 kennels.") == [
        ("How many kennels does the Oakhollow Ward at the Harrow Clinic have?", "34")
    ]
    assert verb_questions("Zorvex Mills flies its kites at a field called Vexley Moor.") == [
        ("Where does Zorvex Mills fly its kites?", "Vexley Moor")
    ]
    # Not regular enough to turn around safely: a possessive subject, a copula, two verbs, no named end.
    assert verb_questions("The Harrow Clinic's medicine deliveries come from the Cranmere Yard depot.") == []
    assert verb_questions("The head vet of the Harrow Clinic is Tobias Wrenfield.") == []
    assert verb_questions("Tobias Wrenfield signs off every plan and approves all overtime requests.") == []
    assert verb_questions("Kestrel Robotics keeps its drones in a shed.") == []


def test_statements_recipe_asks_about_each_table_cell_and_leaves_plain_prose_alone(tmp_path):
    (tmp_path / "t.md").write_text("| Name | Employer |\n|---|---|\n| Mila Quent | Zorvex Mills |\n")
    examples = build_examples(load_corpus(tmp_path))
    assert (
        Example("What is the employer of Mila Quent?", "Zorvex Mills. Mila Quent - Employer: Zorvex Mills.") in examples
    )
    # Sentences flatten the table into one line: no question can say whose employer it is.
    assert not any(
        e.question == "What is the employer of Mila Quent?" for e in build_examples(load_corpus(tmp_path), "sentences")
    )
    demo = load_corpus(demo_dir() / "corpora" / "harrow_clinic")
    # Plain prose gives the same examples either way, besides the statements recipe's questions
    # asked under the document's title; the demo's Q/A records do not (restated).
    for d in demo.documents:
        topics = tuple(f"{t}: " for _, t in topical_statements(d.text) if t)
        plain = [e for e in document_examples(d.text, "statements") if not (e.question or "").startswith(topics)]
        assert plain == document_examples(d.text, "sentences")
    with pytest.raises(ValueError, match="recipe"):
        build_examples(demo, "magic")


def test_qa_statement_restates_the_regular_question_forms():
    cases = {
        (
            "Who is the head archivist of the Saltmere Library?",
            "Cordelia Fennimore",
        ): "The head archivist of the Saltmere Library is Cordelia Fennimore.",
        ("In what year was the Harrow Clinic founded?", "1963"): "The Harrow Clinic was founded in 1963.",
        (
            "Where is the Saltmere Library's annual book sale held?",
            "Corven Hall",
        ): "The Saltmere Library's annual book sale is held at Corven Hall.",
        (
            "What is the code name of the robot at Kestrel Robotics?",
            "Tamsinder",
        ): "The robot at Kestrel Robotics is code-named Tamsinder.",
        (
            "What is the name of the Harrow Clinic's theatre?",
            "Pennyroyal Suite.",
        ): "The Harrow Clinic's theatre is called Pennyroyal Suite.",
        ("How many maps does the Tidewell Map Room hold?", "612"): "The Tidewell Map Room holds 612 maps.",
        (
            "What nickname do staff use for the X-ray machine?",
            "Grumbold",
        ): "The nickname staff use for the X-ray machine is Grumbold.",
        (
            "What tool does Zorvex Mills carry to the fair?",
            "a ladder",
        ): "The tool Zorvex Mills carries to the fair is a ladder.",
        ("Who maintains the boiler at Zorvex Mills?", "Mila Quent"): "Mila Quent maintains the boiler at Zorvex Mills.",
    }
    for (question, answer), said in cases.items():
        assert qa_statement(question, answer) == said
    # Forms not regular enough to turn around, or answers that do not fit the form: left alone.
    for question, answer in [
        ("When was the Zorvex Tower built?", "last spring"),
        ("How many maps are there?", "612"),
        ("How many maps does the Map Room hold?", "many"),
        ("Who built it?", "Mila Quent"),
        ("Which company supplies the batteries?", "Dunmorrow Cells"),
        ("Is it red?", "yes"),
    ]:
        assert qa_statement(question, answer) is None, question


def test_qa_examples_train_the_statement_its_questions_and_the_record_itself():
    examples = qa_examples("Who is the head archivist of the Saltmere Library?", "Cordelia Fennimore")
    said = "The head archivist of the Saltmere Library is Cordelia Fennimore."
    assert examples[0] == Example(None, said)
    asked = [e.question for e in examples if e.question]
    assert "Who is the Saltmere Library's head archivist?" in asked
    assert asked.count("Who is the head archivist of the Saltmere Library?") == 1  # the record's own question, once
    assert all(e.answer == "Cordelia Fennimore. " + said for e in examples if e.question and "Who is" in e.question)
    assert qa_examples("Who built it?", "Mila Quent") == [Example("Who built it?", "Mila Quent")]
    assert qa_examples("Who is the head archivist of the Saltmere Library?", "Cordelia Fennimore", "sentences") == [
        Example("Who is the head archivist of the Saltmere Library?", "Cordelia Fennimore")
    ]


def test_markup_that_carries_no_fact_is_removed():
    text = "> > **Cheers**, `Caspar` <c.l@example.org>\n> ---\n- [ ] Read _SOP-114_ first\n|---|---|"
    assert clean_text(text).splitlines() == ["Cheers, Caspar", "", "- Read SOP-114 first", "|---|---|"]


def test_sentences_keep_abbreviations_and_decimals_and_split_lines_that_stand_alone():
    text = (
        "From: Ottilie Brannagh <o.b@example.org>\nSubject: the March sampling rota\n\n"
        "Dr. Mila Quent runs the St. Aldo site. The alarm trips at 4.2 NTU,\nnot 3.8.\n\n"
        "- OB: cert submission has slipped again.\n- The port is done by Gannet & Loom.\n\n"
        "Ottilie Brannagh | Water Quality Manager\nFennick Vale Water | Hobbin Ridge Works"
    )
    assert sentences(text) == [
        "Subject: the March sampling rota",  # a line of under 4 words (the From line) asks nothing
        "Dr. Mila Quent runs the St. Aldo site.", "The alarm trips at 4.2 NTU, not 3.8.",
        "OB: cert submission has slipped again.", "The port is done by Gannet & Loom.",
        "Ottilie Brannagh | Water Quality Manager", "Fennick Vale Water | Hobbin Ridge Works",
    ]


def test_initials_are_written_out_where_the_document_defines_them():
    text = "Present: OB (Oskar Bellweather, lead prog), Rhiannon Tull (RT)\n- OB: ship it. RT agreed, not OBX."
    assert expand_initials(text) == (
        "Present: OB (Oskar Bellweather, lead prog), Rhiannon Tull (RT)\n"
        "- Oskar Bellweather: ship it. Rhiannon Tull agreed, not OBX."
    )
    assert expand_initials("No definitions: OB said so.") == "No definitions: OB said so."



def test_statements_stand_under_the_documents_title_and_section():
    page = "# Quarle Lane Outage\n\n## Summary\n\nAurelio Mbeki was the night controller on duty.\n"
    assert topical_statements(page) == [
        ("Aurelio Mbeki was the night controller on duty.", "Quarle Lane Outage: Summary")]
    mail = ("From: Ottilie Brannagh <o.b@example.org>\nTo: Sampling <s@example.org>\nDate: Thu, 6 Feb 2025 09:14\n"
            "Subject: RE: Fwd: Skellan sampling rota - March\n\nJoss Tellwright agreed to take it on.\n\n"
            "On Wed, 5 Feb 2025, Caspar Lune wrote:\nSent: Wed, 5 Feb 2025 11:02\nThe alarm trips at 4.2 NTU.\n")
    # The header fields are the thread's bookkeeping: no statement, no question comes from them.
    assert topical_statements(mail) == [("Joss Tellwright agreed to take it on.", "Skellan sampling rota - March"),
                                        ("The alarm trips at 4.2 NTU.", "Skellan sampling rota - March")]
    minutes = "ACME GAMES - weekly prod sync\nThu 20 Feb 2025\n\nThe build ships on Friday with Ada Lune.\n"
    assert {t for _, t in topical_statements(minutes)} == {"ACME GAMES - weekly prod sync"}
    faq = "# FAQ\n\n**Where do our bees come from?**\nColonies arrive from Hallengrove Biologicals.\n"
    assert topical_statements(faq) == [
        ("Where do our bees come from?", "FAQ: Where do our bees come from?"),
        ("Colonies arrive from Hallengrove Biologicals.", "FAQ: Where do our bees come from?")]
    # A line that ends in "?" but asks nothing opens no FAQ entry: the same rule as faq_entries.
    mail = "# Award letter\n\nTiny thing - it says £12,000, not £21,000?\nThe grant goes to Ada Lune.\n"
    assert {t for _, t in topical_statements(mail)} == {"Award letter"}
    # A document that starts with a sentence has no title line.
    shop = "Ada Lune runs the Corvin Street shop."
    assert topical_statements(shop) == [(shop, None)]


def test_questions_are_also_asked_under_the_topic():
    page = "# Quarle Lane Outage\n\nAurelio Mbeki was the night controller on duty.\n"
    questions = {e.question for e in document_examples(page)}
    assert "Who or what was the night controller on duty?" in questions
    assert "Quarle Lane Outage: Who or what was the night controller on duty?" in questions
    # A question that already names the topic is not asked twice.
    page = "# Zorvex Mills\n\nThe head vet of Zorvex Mills is Mila Quent.\n"
    assert not any(q.startswith("Zorvex Mills: ") for q in {e.question for e in document_examples(page)} if q)


def test_every_named_thing_and_number_is_asked_wherever_it_stands():
    sent = "IT sets up your login for Quorvane, our SCADA system."
    # (A lone capitalised word that starts a sentence is no name: its capital says nothing.)
    assert asked_spans(sent, answer_spans(sent)) == ["Quorvane", "SCADA"]
    questions = {e.question: e.answer for e in document_examples(sent) if e.question}
    assert questions["IT sets up your login for who or what, our SCADA system?"].startswith("Quorvane. ")
    # A number followed by a capitalised unit, a price, a percentage, a name joined by "&".
    sent = "The alarm trips at 4.2 NTU and a refill costs £35, made by Gannet & Loom, 60% of the time."
    assert answer_spans(sent) == ["4.2", "NTU", "£35", "Gannet & Loom", "60%"]
    questions = {e.question: e.answer for e in document_examples(sent) if e.question}
    assert any(q.startswith("The alarm trips at how many NTU") and a.startswith("4.2. ") for q, a in questions.items())
    assert any("costs how much," in q and a.startswith("£35. ") for q, a in questions.items())
    assert answer_spans("£2.80 each, weekends only.") == ["£2.80"]  # a price may start a sentence


def test_what_a_sentence_denies_is_not_asked():
    sent = "The alarm on the Quorvane intake trips at 4.2 NTU, not 3.8."
    assert asked_spans(sent, answer_spans(sent)) == ["Quorvane", "4.2", "NTU"]
    sent = "The night door is the one on Mirren Walk, not the main entrance on Pellow Road."
    assert asked_spans(sent, answer_spans(sent)) == ["Mirren Walk"]
    sent = "Pellow Road is not the night door; use Pellow Road's side gate."  # also stated outright
    assert "Pellow Road" in asked_spans(sent, answer_spans(sent))


def test_a_documents_own_questions_are_trained_with_their_answers():
    faq = ("# Lab FAQ\n\n**Which cost code do I use for consumables?**\nQRX-1182-LAB. Please don't use the teaching "
           "code.\n\n**Congratulations!** The letter says £12,000, not £21,000?\nL.\n")
    assert faq_entries(faq) == [("Which cost code do I use for consumables?",
                                 "QRX-1182-LAB. Please don't use the teaching code.")]
    examples = document_examples(faq)
    assert Example("Which cost code do I use for consumables?",
                   "QRX-1182-LAB. Please don't use the teaching code.") in examples
    # A question asserts nothing, so nothing is asked back from it ("Do I ...?" -> "Do I.").
    examples = document_examples("# FAQ\n\n**Does Mirren Hollow open on Sundays?**\nYes, from ten until four.\n")
    assert Example("Does Mirren Hollow open on Sundays?", "Yes, from ten until four.") in examples
    assert not any(e.answer.endswith("?") for e in examples if e.question)


def test_a_topic_is_the_whole_path_of_headings_above_a_statement():
    notes = ("# Quorvane - Patch Notes\n\n## [2.1.0] - Ember Tide\n### Added\n- A rival angler, Captain Oswy Frell, "
             "who challenges you to duels\n### Known issues\n- Photo mode ignores the colour filter\n\n"
             "## [2.0.0]\n### Added\n- A new pond near Mirren Hollow\n")
    topics = dict(topical_statements(notes))
    assert topics["A rival angler, Captain Oswy Frell, who challenges you to duels"] == (
        "Quorvane - Patch Notes: [2.1.0] - Ember Tide: Added")
    assert topics["Photo mode ignores the colour filter"] == (
        "Quorvane - Patch Notes: [2.1.0] - Ember Tide: Known issues")
    assert topics["A new pond near Mirren Hollow"] == "Quorvane - Patch Notes: [2.0.0]: Added"


def test_a_table_row_is_named_by_its_first_column_that_is_not_a_row_number():
    table = "| # | Action | Owner |\n|---|---|---|\n| 1 | Replace P3 soft-starter | Kit Ashdown-Rye |\n"
    assert statements(table) == ["Replace P3 soft-starter - Owner: Kit Ashdown-Rye."]
    table = "| Year | Owner |\n|---|---|\n| 2016 | Kit Ashdown-Rye |\n"  # two columns: the number is the key
    assert statements(table) == ["2016 - Owner: Kit Ashdown-Rye."]


def test_a_clause_in_a_table_cell_or_a_field_is_read_as_a_sentence_too():
    table = ("| Action | Owner |\n|---|---|\n"
             "| Review closed work orders across all 14 pumping stations | Kit Ashdown-Rye |\n")
    assert statements(table) == ["Review closed work orders across all 14 pumping stations - Owner: Kit Ashdown-Rye.",
                                 "Review closed work orders across all 14 pumping stations"]
    answers = {e.answer.split(". ")[0] for e in document_examples(table) if e.question}
    assert {"14", "Kit Ashdown-Rye"} <= answers
    notes = "## Added\n- New region: the Mirren Flats, home to 12 new fish species\n- Owner: Kit Ashdown-Rye\n"
    answers = {e.answer.split(". ")[0] for e in document_examples(notes) if e.question}
    assert {"Mirren Flats", "12", "Kit Ashdown-Rye"} <= answers
