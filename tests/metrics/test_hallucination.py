"""POPE, CHAIR and MME scorers against hand-made cases whose expected values were worked out by hand
from the published scripts' rules (multimodal notes §2.2b), and against scikit-learn's metrics."""

import math

import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from attnzoo.errors import InvalidInputError, InvalidOptionError, MissingDependencyError
from attnzoo.metrics.hallucination import (
    POPE_PARSERS,
    ChairScorer,
    ChairVocabulary,
    chair_summary,
    get_lemmatizer,
    mme_scores,
    parse_mme_answer,
    parse_pope_answer,
    pope_metrics,
    sentence_split,
    treebank_tokenize,
)

# answer: (pope, opera, vcd under label yes, vcd under label no, strict)
POPE_CASES = {
    "Yes": ("yes", "yes", "yes", "yes", "yes"),
    "yes.": ("yes", "yes", "yes", "yes", "yes"),
    "No": ("no", "no", "no", "no", "no"),
    "no": ("no", "no", "no", "no", "no"),
    "NO": ("yes", "no", "no", "no", "no"),  # POPE's rule misses capitals
    "No!": ("yes", "yes", "no", "no", "no"),  # "No!" is no word of either list
    "No, there is not.": ("no", "no", "no", "no", "no"),
    "Nope": ("yes", "yes", "no", "no", None),  # "nope" contains "no"
    "Yes, there is a cat in the image.": ("yes", "yes", "yes", "yes", "yes"),
    "There is no cat in the image.": ("no", "no", "no", "no", "no"),
    "There isn't a cat.": ("yes", "no", "no", "yes", None),  # only OPERA's reads n't
    "I cannot tell.": ("yes", "yes", "no", "no", None),  # "cannot" contains "no"
    "": ("yes", "yes", "no", "yes", None),
    "I see two eyes": ("yes", "yes", "yes", "yes", None),  # "eyes" contains "yes"
    "A snowboard.": ("yes", "yes", "no", "no", None),  # "snowboard" contains "no"
    "Yes. But no dog.": ("yes", "no", "yes", "no", None),  # POPE reads the first sentence only
    "no\nthere is none": ("yes", "yes", "no", "no", "no"),  # single-space split: "no\nthere" is one word
    "YES": ("yes", "yes", "yes", "yes", "yes"),
}


@pytest.mark.parametrize("answer", list(POPE_CASES))
def test_pope_parsers_on_hand_made_answers(answer):
    pope, opera, vcd_yes, vcd_no, strict = POPE_CASES[answer]
    assert parse_pope_answer(answer, "pope") == pope
    assert parse_pope_answer(answer, "opera") == opera
    assert parse_pope_answer(answer, "vcd", label="yes") == vcd_yes
    assert parse_pope_answer(answer, "vcd", label="no") == vcd_no
    assert parse_pope_answer(answer, "strict") == strict


def test_pope_parser_errors():
    with pytest.raises(InvalidOptionError, match="unknown POPE parser"):
        parse_pope_answer("yes", "llava")
    with pytest.raises(InvalidInputError, match="label"):
        parse_pope_answer("yes", "vcd")
    assert set(POPE_PARSERS) == {"pope", "opera", "vcd", "strict"}


def test_pope_metrics_by_hand():
    predictions = ["yes", "yes", "no", "no", None, "yes"]
    labels = ["yes", "no", "no", "yes", "yes", "yes"]
    m = pope_metrics(predictions, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (2, 1, 1, 1, 6)
    assert m["accuracy"] == pytest.approx(100 * 3 / 6)
    assert m["precision"] == pytest.approx(100 * 2 / 3)
    assert m["recall"] == pytest.approx(100 * 2 / 4)  # the unparsed yes-question is a miss
    assert m["f1"] == pytest.approx(2 * (200 / 3) * 50 / (200 / 3 + 50))
    assert m["yes_ratio"] == pytest.approx(50.0)
    assert m["unparsed"] == pytest.approx(100 / 6)


def test_pope_metrics_match_scikit_learn_when_every_answer_parses():
    answers = list(POPE_CASES) * 3
    labels = (["yes", "no"] * len(answers))[: len(answers)]
    for parser in ("pope", "opera", "vcd"):
        preds = [parse_pope_answer(a, parser, y) for a, y in zip(answers, labels)]
        m = pope_metrics(preds, labels)
        y_true, y_pred = [y == "yes" for y in labels], [p == "yes" for p in preds]
        assert m["accuracy"] == pytest.approx(100 * accuracy_score(y_true, y_pred))
        assert m["precision"] == pytest.approx(100 * precision_score(y_true, y_pred))
        assert m["recall"] == pytest.approx(100 * recall_score(y_true, y_pred))
        assert m["f1"] == pytest.approx(100 * f1_score(y_true, y_pred))


def test_vcd_yes_ratio_depends_on_the_labels():
    answers = ["I cannot tell."] * 4
    as_yes = pope_metrics([parse_pope_answer(a, "vcd", "yes") for a in answers], ["yes"] * 4)
    as_no = pope_metrics([parse_pope_answer(a, "vcd", "no") for a in answers], ["no"] * 4)
    assert (as_yes["yes_ratio"], as_no["yes_ratio"]) == (0.0, 0.0)
    empty_yes = pope_metrics([parse_pope_answer("", "vcd", "yes")], ["yes"])
    empty_no = pope_metrics([parse_pope_answer("", "vcd", "no")], ["no"])
    assert (empty_yes["accuracy"], empty_no["accuracy"]) == (0.0, 0.0)  # neither word: wrong under both labels
    assert (empty_yes["yes_ratio"], empty_no["yes_ratio"]) == (0.0, 100.0)


def test_pope_metrics_errors():
    with pytest.raises(InvalidInputError, match="labels"):
        pope_metrics(["yes"], ["maybe"])
    with pytest.raises(InvalidInputError, match="answers for"):
        pope_metrics(["yes"], ["yes", "no"])
    assert pope_metrics(["no", "no"], ["yes", "no"])["precision"] == 0.0  # no yes answer: 0, not a crash


# answer: (mme official eval_tool, lmms-eval, strict)
MME_CASES = {
    "Yes": ("yes", "yes", "yes"),
    "yes, it is": ("yes", "yes", "yes"),
    "No.": ("no", "no", "no"),
    "Not sure": ("no", "no", None),  # "not " starts with "no"
    "There is a dog": (None, None, None),
    "  yes": (None, "yes", "yes"),  # the released tool does not strip
    "y": (None, "yes", None),
    "know": ("no", "no", None),
}


@pytest.mark.parametrize("answer", list(MME_CASES))
def test_mme_parsers(answer):
    assert tuple(parse_mme_answer(answer, p) for p in ("mme", "lmms-eval", "strict")) == MME_CASES[answer]


def test_mme_scores_by_hand():
    rows = [
        ("existence", "a.jpg", "yes", "yes"),
        ("existence", "a.jpg", "no", "no"),
        ("existence", "b.jpg", "yes", "yes"),
        ("existence", "b.jpg", "no", None),
        ("count", "c.jpg", "yes", "no"),
        ("count", "c.jpg", "no", "yes"),
    ]
    scores = mme_scores(rows)
    assert scores["existence"] == {
        "acc": 75.0,
        "acc_plus": 50.0,
        "score": 125.0,
        "images": 2,
        "questions": 4,
        "incomplete_images": 0,
        "incomplete": [],
    }
    assert scores["count"]["score"] == 0.0
    with pytest.raises(InvalidInputError, match="more than 2 answers"):
        mme_scores([*rows, ("count", "c.jpg", "no", "no")])


def test_an_mme_image_with_a_skipped_question_is_left_out_and_counted():
    """MME scores pairs: b.jpg's second question skipped, b.jpg is left out (only a.jpg's pair is scored:
    1 of 2 right, not both); a subtask with no complete pair has no score (NaN), not a score of 0."""
    rows = [
        ("existence", "a.jpg", "yes", "yes"),
        ("existence", "a.jpg", "no", "yes"),
        ("existence", "b.jpg", "yes", "yes"),
        ("count", "c.jpg", "yes", "yes"),
    ]
    scores = mme_scores(rows)
    assert scores["existence"] == {
        "acc": 50.0,
        "acc_plus": 0.0,
        "score": 50.0,
        "images": 1,
        "questions": 2,
        "incomplete_images": 1,
        "incomplete": ["b.jpg"],
    }
    assert math.isnan(scores["count"]["score"]) and scores["count"]["incomplete"] == ["c.jpg"]


# -- CHAIR -----------------------------------------------------------------------------------------
def test_tokeniser_follows_the_treebank_conventions():
    assert treebank_tokenize("a dog's toy, isn't it? yes.") == [
        "a",
        "dog",
        "'s",
        "toy",
        ",",
        "is",
        "n't",
        "it",
        "?",
        "yes",
        ".",
    ]
    assert treebank_tokenize('he said "hi" (twice)... then left.') == [
        "he", "said", "``", "hi", "''", "(", "twice", ")", "...", "then", "left", "."
    ]  # fmt: skip
    assert treebank_tokenize("1,000 cats: e.g. one. we cannot go") == [
        "1,000", "cats", ":", "e.g.", "one", ".", "we", "can", "not", "go"
    ]  # fmt: skip
    assert sentence_split("a dog. a cat.\n\nmr. smith sat.") == ["a dog.", "a cat.", "mr. smith sat."]


def test_tokeniser_matches_nltk_on_caption_sentences():
    from nltk.tokenize import NLTKWordTokenizer

    sentences = [
        "the image features a woman sitting at a dining table, taking a picture of a pizza with her camera.",
        "there are several people in the scene, some of them sitting at the table and others standing nearby.",
        'a sign reads "stop" near the road; cars (two of them) pass by -- quickly!',
        "the dog's owner holds a frisbee: it's red, and they're playing in the park.",
        "prices: $5 & 10% off @ the store #1 *today*?",
        "a man, 30, stands at 3:45 near 1,000 birds...",
    ]
    tokenizer = NLTKWordTokenizer()
    for sentence in sentences:
        assert treebank_tokenize(sentence) == tokenizer.tokenize(sentence), sentence


GROUND_TRUTH = {
    1: {"person", "dog"},
    2: {"hot dog", "dining table", "person"},
    3: {"bird", "toilet"},
    4: {"toilet"},
    5: {"truck"},
    6: {"cake"},
    7: {"tie"},
}
CAPTIONS = {
    # synonyms, plurals, a repeated object (couch twice, both hallucinated)
    1: "A man and two dogs sit on a couch next to a sofa.",
    # "men" is never a person (WordNet keeps it); "hot dogs" is one word; "dining table" via "table"
    2: "Three men are eating hot dogs at a dining table.",
    # "baby bird" is a bird, "toilet seat" a toilet; the sink is hallucinated
    3: "A baby bird sits on the toilet seat near the sink.",
    # with "toilet" present, "seat" is no chair
    4: "The seat of the toilet is open.",
    # "pickup truck" is two trucks; "motor bike" is listed with a stray space and never matches
    5: "A pickup truck and a motor bike.",
    # "children" is a person; "iPhone" (capital) and " cheesecake" (stray space) never match
    6: "Children play with an iPhone and a cheesecake.",
    # adjective "orange" counts as the fruit; "ties" is a tie
    7: "She wears orange ties.",
}
# image: (objects mentioned in order, hallucinated objects, recalled objects, length in tokens)
EXPECTED = {
    1: (["person", "dog", "couch", "couch"], ["couch", "couch"], {"person", "dog"}, 14),
    2: (["hot dog", "dining table"], [], {"hot dog", "dining table"}, 10),
    3: (["bird", "toilet", "sink"], ["sink"], {"bird", "toilet"}, 10),
    4: (["toilet"], [], {"toilet"}, 8),
    5: (["truck", "truck"], [], {"truck"}, 7),
    6: (["person"], ["person"], set(), 9),
    7: (["orange", "tie"], ["orange"], {"tie"}, 5),
}


def test_chair_words_on_hand_made_captions():
    scorer = ChairScorer(GROUND_TRUTH, lemmatizer="builtin")
    for image_id, caption in CAPTIONS.items():
        row = scorer.score_caption(image_id, caption)
        objects, hallucinated, recalled, length = EXPECTED[image_id]
        assert [o for _, o in row["mentions"]] == objects, caption
        assert [o for _, o in row["hallucinated"]] == hallucinated, caption
        assert set(row["recalled"]) == recalled, caption
        assert row["length"] == length, caption


def test_chair_metrics_by_hand():
    scorer = ChairScorer(GROUND_TRUTH, lemmatizer="builtin")
    out = scorer.score(CAPTIONS.items())
    mentions = sum(len(e[0]) for e in EXPECTED.values())  # 15
    hallucinated = sum(len(e[1]) for e in EXPECTED.values())  # 5
    assert out["chair_s"] == pytest.approx(100 * 4 / 7)  # captions 1, 3, 6, 7
    assert out["chair_i"] == pytest.approx(100 * hallucinated / mentions)
    assert out["recall"] == pytest.approx(100 * 9 / 11)  # recalled 2+2+2+1+1+0+1 of 11 ground-truth objects
    assert out["length"] == pytest.approx(sum(e[3] for e in EXPECTED.values()) / 7)
    assert out == {**chair_summary(out["captions"]), "captions": out["captions"]}


def test_chair_ground_truth_from_coco_includes_caption_objects():
    scorer = ChairScorer.from_coco(
        {42: ["person", "dining table", "person"]},
        {42: ["Two kids eat pizza at a table.", "A boy with a slice of pizza."]},
        lemmatizer="builtin",
    )
    assert scorer.ground_truth[42] == {"person", "dining table", "pizza"}
    row = scorer.score_caption(42, "A girl eats a donut and a pizza.")
    assert [o for _, o in row["hallucinated"]] == ["donut"]
    with pytest.raises(InvalidInputError, match="no CHAIR ground truth"):
        scorer.score_caption(7, "a cat")
    with pytest.raises(InvalidInputError, match="vocabulary"):
        ChairScorer.from_coco({1: ["spaceship"]}, {}, lemmatizer="builtin")


def test_chair_vocabulary_is_the_published_list():
    vocab = ChairVocabulary.default()
    assert len(vocab.objects) == 80
    assert (
        vocab.synonyms["sofa"] == "couch"
        and vocab.synonyms["tv"] == "tv"
        and vocab.synonyms["hairdryer"] == "hair drier"
    )
    assert " motor bike" in vocab.synonyms and "motor bike" not in vocab.synonyms
    assert vocab.double_words["baby dog"] == "dog" and vocab.double_words["bow tie"] == "tie"
    with pytest.raises(InvalidInputError, match="no captions"):
        chair_summary([])


def test_nltk_lemmatiser_needs_its_data(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(MissingDependencyError, match="nltk.downloader"):
        get_lemmatizer("nltk")
    with pytest.raises(InvalidOptionError, match="lemmatiser"):
        get_lemmatizer("spacy")


def test_nltk_lemmatiser_agrees_with_builtin_on_nouns():
    try:
        scorer = ChairScorer(GROUND_TRUTH, lemmatizer="nltk")
    except MissingDependencyError:
        pytest.skip(
            "nltk's data (punkt, averaged perceptron tagger, wordnet) is not installed; never downloaded in tests"
        )
    builtin = ChairScorer(GROUND_TRUTH, lemmatizer="builtin")
    for caption in ("Two dogs and three cats on a couch.", "A woman holds knives and forks.", "Children ride bikes."):
        assert scorer.caption_objects(caption).objects == builtin.caption_objects(caption).objects


def test_builtin_noun_lemmas_match_wordnet():
    """The shipped table against WordNet itself, where nltk's WordNet data is installed."""
    import nltk

    try:
        from nltk.stem import WordNetLemmatizer

        lemmatize = WordNetLemmatizer().lemmatize
        lemmatize("dogs")
    except LookupError:
        pytest.skip("nltk's WordNet data is not installed; never downloaded in tests")
    from attnzoo.metrics.hallucination import _noun_lemmas

    for form, lemma in _noun_lemmas().items():
        assert lemmatize(form, "n") == lemma, form
    for word in ("men", "people", "scissors", "bus", "dog"):
        assert lemmatize(word, "n") == word
    assert nltk  # imported for its data path
