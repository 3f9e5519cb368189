"""Object-hallucination metrics of LVLMs: POPE, CHAIR and MME (multimodal notes §2.1-§2.3, §2.2b).

**POPE** answers are turned into yes / no by one of four named parsers; the published ones disagree
on the same answers, so a report always names its parser (:data:`POPE_PARSERS`):

* ``"pope"``: POPE's ``evaluate.py`` (LLaVA's ``eval_pope.py`` is the same rule): only the text
  before the first ``.``, commas dropped, split on single spaces; "no" when a word is exactly
  ``No``, ``no`` or ``not``, else "yes" ("NO", "No!", "Nope", "I cannot tell" and "" are "yes").
* ``"opera"``: OPERA's and PAI's ``pope_eval`` recorder: the whole answer, ``.`` and ``,`` dropped,
  split on single spaces; "no" when a word is ``No``, ``no``, ``not`` or ``NO`` or ends in ``n't``.
* ``"vcd"``: VCD's and AGLA's ``eval_pope.py`` (identical): a label-dependent lower-case substring
  test: under label yes the answer is "yes" iff it contains ``yes``; under label no it is "no" iff
  it contains ``no`` ("eyes" is yes, "snowboard" and "cannot" are no; the yes-ratio depends on the
  labels).
* ``"strict"`` (ours, reported beside the published one): exactly one of the whole words ``yes`` /
  ``no`` (any case); an answer with neither or both is *unparsed* and counted wrong.

Scores are percentages: accuracy, precision, recall, F1 and the yes-ratio (share of answers read as
yes), plus the counts and the unparsed share.

**CHAIR** follows the de-facto scorer (``chair.py`` of OPERA / PAI, after Rohrbach et al. 2018):
lower-cased captions, Treebank word tokens, WordNet lemmas, the COCO double-word rules ("baby dog"
is a dog, "toilet seat" a toilet, "hot dog" one word), "seat" dropped when "toilet" is there, the
synonym list (``data/chair_synonyms.txt``) mapping words to the 80 objects. CHAIR_s is the share of
captions with a hallucinated object, CHAIR_i the share of hallucinated object mentions, recall the
share of ground-truth objects mentioned (micro, over all captions), length the mean number of
tokens (punctuation included, a double word counts once). The scorer stores length as 0.01 x the
mean and prints it x 100; we give the mean itself. The ground truth of an image is its instance
annotations plus the objects named in its human captions (read with the same lemmatiser).

Two lemmatisers (:data:`LEMMATIZERS`):

* ``"nltk"``: the scorer's own pipeline (``nltk.word_tokenize``, ``nltk.pos_tag`` and WordNet's
  lemmatiser on the tag's part of speech); needs nltk and its data (punkt, the averaged perceptron
  tagger and WordNet), which are *not* downloaded here: :class:`~attnzoo.errors.MissingDependencyError`
  says how to get them.
* ``"builtin"``: no downloads: our Treebank tokeniser and punkt-like sentence split, and WordNet
  3.0's noun lemmas of every form the vocabulary can match (``data/chair_noun_lemmas.txt``). It
  equals ``"nltk"`` except where the tagger reads a word as a verb or an adjective whose lemma
  differs from the noun's ("skiing" tagged VBG is "ski", an object; read as a noun it stays
  "skiing"; "seated" -> "seat"). See ``docs/hallucination-benchmarks.md`` for how often that occurs.

**MME** (perception subset): each image has two questions; acc is the share of questions right,
acc+ the share of images with both right, the subtask score acc + acc+ (each out of 100). Parsers:
``"mme"`` (the released ``eval_tool/calculation.py``: lower-case, exactly yes / no, else ``yes`` or
``no`` within the first four characters, else other), ``"lmms-eval"`` (the same after stripping
spaces and dots, and single letters y / n) and ``"strict"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from attnzoo.errors import InvalidInputError, InvalidOptionError, MissingDependencyError

__all__ = [
    "CHAIR_DOUBLE_WORDS",
    "LEMMATIZERS",
    "MME_PARSERS",
    "POPE_PARSERS",
    "CaptionObjects",
    "ChairScorer",
    "ChairVocabulary",
    "chair_summary",
    "mme_scores",
    "parse_mme_answer",
    "parse_pope_answer",
    "pope_metrics",
    "sentence_split",
    "treebank_tokenize",
]

DATA = Path(__file__).parent / "data"

POPE_PARSERS = ("pope", "opera", "vcd", "strict")
MME_PARSERS = ("mme", "lmms-eval", "strict")
LEMMATIZERS = ("builtin", "nltk")


# -- yes / no parsing ------------------------------------------------------------------------------
def _strict_yes_no(answer: str) -> str | None:
    kinds = {w for w in re.findall(r"[a-z]+", answer.lower()) if w in ("yes", "no")}
    return kinds.pop() if len(kinds) == 1 else None


def _pope_rule(answer: str) -> str:
    first_sentence = answer.split(".")[0].replace(",", "")
    return "no" if {"No", "no", "not"} & set(first_sentence.split(" ")) else "yes"


def _opera_rule(answer: str) -> str:
    words = answer.replace(".", "").replace(",", "").split(" ")
    negative = any(w in ("No", "no", "not", "NO") or w.endswith("n't") for w in words)
    return "no" if negative else "yes"


def _vcd_rule(answer: str, label: str | None) -> str:
    if label not in ("yes", "no"):
        raise InvalidInputError("the vcd parser (VCD's / AGLA's eval_pope.py) needs the question's label, yes or no")
    text = answer.lower().strip()
    if label == "yes":
        return "yes" if "yes" in text else "no"
    return "no" if "no" in text else "yes"


def parse_pope_answer(answer: str, parser: str = "pope", label: str | None = None) -> str | None:
    """``"yes"``, ``"no"`` or ``None`` (unparsed: the strict parser only) for one POPE answer."""
    if parser == "pope":
        return _pope_rule(answer)
    if parser == "opera":
        return _opera_rule(answer)
    if parser == "vcd":
        return _vcd_rule(answer, label)
    if parser == "strict":
        return _strict_yes_no(answer)
    raise InvalidOptionError(f"unknown POPE parser {parser!r}; choose one of {', '.join(POPE_PARSERS)}")


def _percent(num: float, den: float) -> float:
    return 100.0 * num / den if den else 0.0


def pope_metrics(predictions: Sequence[str | None], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, yes-ratio and unparsed share (percent) of parsed answers.

    An unparsed answer (``None``) is wrong under either label and is neither yes nor no; precision
    with no "yes" answer, and F1 with precision + recall = 0, are 0 (the official scripts divide by
    zero there)."""
    if len(predictions) != len(labels):
        raise InvalidInputError(f"{len(predictions)} answers for {len(labels)} labels")
    if not labels:
        raise InvalidInputError("no POPE answers to score")
    bad = sorted({str(x) for x in labels} - {"yes", "no"})
    if bad:
        raise InvalidInputError(f"POPE labels are yes or no, got {bad}")
    pairs = list(zip(predictions, labels))
    tp = sum(p == "yes" and y == "yes" for p, y in pairs)
    fp = sum(p == "yes" and y == "no" for p, y in pairs)
    tn = sum(p == "no" and y == "no" for p, y in pairs)
    fn = sum(p == "no" and y == "yes" for p, y in pairs)
    unparsed = sum(p is None for p in predictions)
    n = len(pairs)
    precision = _percent(tp, tp + fp)
    recall = _percent(tp, sum(y == "yes" for y in labels))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": _percent(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": _percent(tp + fp, n),
        "unparsed": _percent(unparsed, n),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
    }


def parse_mme_answer(answer: str, parser: str = "mme") -> str | None:
    """``"yes"``, ``"no"`` or ``None`` (the scripts' "other": counted wrong) for one MME answer."""
    if parser == "strict":
        return _strict_yes_no(answer)
    if parser not in MME_PARSERS:
        raise InvalidOptionError(f"unknown MME parser {parser!r}; choose one of {', '.join(MME_PARSERS)}")
    text = answer.lower()
    if parser == "lmms-eval":
        text = text.strip().replace(".", "")
        if len(text) == 1:
            return {"y": "yes", "n": "no"}.get(text)
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else None


def mme_scores(rows: Iterable[tuple[str, str, str, str | None]]) -> dict[str, dict[str, Any]]:
    """Per subtask, from ``(subtask, image, label, parsed answer)`` rows: acc, acc+ and score = acc +
    acc+ (percent, so the score is out of 200), over the images with both their questions answered, as
    MME's calculation scores pairs. An image with one answer (the other skipped) is left out of all
    three and counted in ``incomplete_images`` (named in ``incomplete``); a subtask with no complete
    image scores NaN. More than two answers for an image are refused."""
    by_image: dict[str, dict[str, list[bool]]] = {}
    for subtask, image, label, parsed in rows:
        by_image.setdefault(subtask, {}).setdefault(image, []).append(parsed == str(label).lower())
    out: dict[str, dict[str, Any]] = {}
    for subtask, images in by_image.items():
        extra = sorted(name for name, hits in images.items() if len(hits) > 2)
        if extra:
            raise InvalidInputError(
                f"MME scores pairs of questions: {subtask} images {extra[:5]} have more than 2 answers"
            )
        pairs = [hits for hits in images.values() if len(hits) == 2]
        hits = [h for pair in pairs for h in pair]
        acc = _percent(sum(hits), len(hits)) if pairs else math.nan
        acc_plus = _percent(sum(all(pair) for pair in pairs), len(pairs)) if pairs else math.nan
        out[subtask] = {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": acc + acc_plus,
            "images": len(pairs),
            "questions": len(hits),
            "incomplete_images": len(images) - len(pairs),
            "incomplete": sorted(name for name, answered in images.items() if len(answered) < 2),
        }
    return out


# -- tokenisation (Penn Treebank conventions, as nltk.word_tokenize applies them) -------------------
# Words that end in a period without ending a sentence (punkt's English model knows these and more).
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "e.g", "i.e", "u.s", "u.k", "a.m", "p.m"})
_CLOSERS = "]})>\"'”’»"


def sentence_split(text: str) -> list[str]:
    """Sentences, split after ``.``, ``!`` or ``?`` (and closing quotes or brackets) followed by
    white space, except after a known abbreviation or a single-letter initial (as punkt decides on
    lower-cased captions)."""
    sentences, start = [], 0
    for match in re.finditer(rf"[.!?][{re.escape(_CLOSERS)}]*(?=\s)", text):
        word = text[start : match.start()].split()[-1:] or [""]
        stem = word[0].lower()
        if match.group().startswith(".") and (stem in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha())):
            continue
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


_CONTRACTIONS = {  # whole words split as the Treebank does
    "cannot": "can not",
    "d'ye": "d' ye",
    "gimme": "gim me",
    "gonna": "gon na",
    "gotta": "got ta",
    "lemme": "lem me",
    "more'n": "more 'n",
    "wanna": "wan na",
    "'tis": "'t is",
    "'twas": "'t was",
}
_CONTRACTION_RE = re.compile(r"(?i)(?<![\w'])(" + "|".join(re.escape(k) for k in _CONTRACTIONS) + r")(?![\w'])")
# Each step: (what it separates, pattern, replacement), applied in order to one sentence.
_TREEBANK_STEPS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("opening unicode quotes and backticks", re.compile(r"([«“‘„]|`+)"), r" \1 "),
    ("a double quote opening the sentence", re.compile(r'^"'), "``"),
    ("an opening double quote", re.compile(r"``"), " `` "),
    ("a double quote after a space or bracket", re.compile(r"([ (\[{<])(\"|'')"), r"\1 `` "),
    ("an apostrophe before a lone letter", re.compile(r"(?i)(')(?!re|ve|ll|m|t|s|d|n)(\w)\b"), r"\1 \2"),
    ("the sentence's final period", re.compile(r"(?<=[^.])\.([\]\)}>\"'»”’ ]*)\s*$"), r" . \1 "),
    ("a comma or colon before a non-digit", re.compile(r"([:,])(?=[^\d])"), r" \1 "),
    ("a comma or colon ending the sentence", re.compile(r"([:,])$"), r" \1 "),
    ("an ellipsis", re.compile(r"\.{2,}"), r" \g<0> "),
    ("symbols", re.compile(r"[;@#$%&?!*]"), r" \g<0> "),
    ("an apostrophe ending a word", re.compile(r"(?<=[^'])' "), " ' "),
    ("brackets", re.compile(r"[\]\[(){}<>]"), r" \g<0> "),
    ("double dashes", re.compile(r"--"), " -- "),
)
_CLOSING_STEPS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("closing unicode quotes", re.compile(r"([»”’])"), r" \1 "),
    ("closing double quotes", re.compile(r"''|\""), " '' "),
    ("clitics 's 'm 'd and a lone apostrophe", re.compile(r"(?i)(?<=[^' ])('s|'m|'d|') "), r" \1 "),
    ("clitics 'll 're 've n't", re.compile(r"(?i)(?<=[^' ])('ll|'re|'ve|n't) "), r" \1 "),
)


def _treebank_sentence(sentence: str) -> list[str]:
    text = sentence
    for _, pattern, replacement in _TREEBANK_STEPS:
        text = pattern.sub(replacement, text)
    text = f" {text} "
    for _, pattern, replacement in _CLOSING_STEPS:
        text = pattern.sub(replacement, text)
    text = _CONTRACTION_RE.sub(lambda m: _CONTRACTIONS[m.group(1).lower()], text)
    return text.split()


def treebank_tokenize(text: str) -> list[str]:
    """Word tokens of ``text`` by sentence, as ``nltk.word_tokenize`` gives them without needing
    punkt's data (its sentence split is approximated by :func:`sentence_split`)."""
    return [token for sentence in sentence_split(text) for token in _treebank_sentence(sentence)]


# -- CHAIR -----------------------------------------------------------------------------------------
#: Word pairs the scorer merges before looking words up (after lemmatising): each maps to itself ...
CHAIR_DOUBLE_WORDS = (
    "motor bike",
    "motor cycle",
    "air plane",
    "traffic light",
    "street light",
    "traffic signal",
    "stop light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "suit case",
    "sports ball",
    "baseball bat",
    "baseball glove",
    "tennis racket",
    "wine glass",
    "hot dog",
    "cell phone",
    "mobile phone",
    "teddy bear",
    "hair drier",
    "potted plant",
    "bow tie",
    "laptop computer",
    "stove top oven",
    "home plate",
    "train track",
)
# ... except qualified animals and vehicles ("baby bird" is a bird, not a person) and three rewrites.
_QUALIFIED_ANIMALS = (
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "animal",
    "cub",
)
_QUALIFIED_VEHICLES = ("jet", "train")
_REWRITES = {"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"}


@dataclass(frozen=True)
class ChairVocabulary:
    """The objects CHAIR counts: ``synonyms`` maps each word to its object (a word listed for two
    objects belongs to the later one, as in the scorer) and ``double_words`` merges word pairs."""

    synonyms: Mapping[str, str]
    double_words: Mapping[str, str]

    @classmethod
    def from_synonym_lines(cls, lines: Iterable[str]) -> ChairVocabulary:
        synonyms: dict[str, str] = {}
        for line in lines:
            if not line.strip() or line.startswith("#"):
                continue
            words = line.strip().split(", ")  # exactly the scorer's split: stray spaces stay in the words
            for word in words:
                synonyms[word] = words[0]
        double = {pair: pair for pair in CHAIR_DOUBLE_WORDS}
        for animal in _QUALIFIED_ANIMALS:
            double[f"baby {animal}"] = double[f"adult {animal}"] = animal
        for vehicle in _QUALIFIED_VEHICLES:
            double[f"passenger {vehicle}"] = vehicle
        double.update(_REWRITES)
        return cls(synonyms, double)

    @classmethod
    def default(cls) -> ChairVocabulary:
        return _default_vocabulary()

    @property
    def objects(self) -> list[str]:
        return list(dict.fromkeys(self.synonyms.values()))


@cache
def _default_vocabulary() -> ChairVocabulary:
    return ChairVocabulary.from_synonym_lines((DATA / "chair_synonyms.txt").read_text().splitlines())


@cache
def _noun_lemmas() -> dict[str, str]:
    rows = (line.split("\t") for line in (DATA / "chair_noun_lemmas.txt").read_text().splitlines())
    return {row[0]: row[1] for row in rows if len(row) == 2 and not row[0].startswith("#")}


def _builtin_lemmas(caption: str) -> list[str]:
    table = _noun_lemmas()
    return [table.get(token, token) for token in treebank_tokenize(caption.lower())]


_NLTK_DATA = "punkt punkt_tab averaged_perceptron_tagger averaged_perceptron_tagger_eng wordnet"


def _nltk_lemmatizer() -> Callable[[str], list[str]]:
    """The de-facto scorer's own tokeniser, tagger and lemmatiser (nltk + its data)."""
    try:
        import nltk
        from nltk.stem import WordNetLemmatizer
    except ImportError as err:
        raise MissingDependencyError(
            "CHAIR's nltk lemmatiser needs nltk (pip install nltk) and its data; or use the builtin lemmatiser"
        ) from err
    lemmatizer = WordNetLemmatizer()
    parts = {"J": "a", "V": "v", "N": "n", "R": "r"}  # WordNet's part-of-speech letters; other tags read as nouns

    def lemmas(caption: str) -> list[str]:
        words = nltk.word_tokenize(caption.lower())
        return [lemmatizer.lemmatize(word, pos=parts.get(tag[:1], "n")) for word, tag in nltk.pos_tag(words)]

    try:
        lemmas("two dogs sat.")
    except LookupError as err:
        raise MissingDependencyError(
            "CHAIR's nltk lemmatiser needs nltk's data (punkt, the averaged perceptron tagger, WordNet), which "
            f"attnzoo does not download: run `python -m nltk.downloader {_NLTK_DATA}` once on a machine with "
            "network access (or copy an nltk_data folder and set NLTK_DATA), or use the builtin lemmatiser"
        ) from err
    return lemmas


def get_lemmatizer(name: str) -> Callable[[str], list[str]]:
    """A caption -> lemma tokens function by name (:data:`LEMMATIZERS`)."""
    if name == "builtin":
        return _builtin_lemmas
    if name == "nltk":
        return _nltk_lemmatizer()
    raise InvalidOptionError(f"unknown CHAIR lemmatiser {name!r}; choose one of {', '.join(LEMMATIZERS)}")


@dataclass
class CaptionObjects:
    """What CHAIR reads in one caption: ``tokens`` (lemmas after merging double words; their count is
    the caption's length), ``words`` (those that name objects), ``objects`` (their objects, in order,
    repeats kept) and ``positions`` (of each word in ``tokens``)."""

    tokens: list[str]
    words: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)


class ChairScorer:
    """CHAIR for captions of images whose ground-truth objects are known.

    ``ground_truth`` maps an image id to its objects (names from the vocabulary); build it from COCO
    annotations with :meth:`from_coco`."""

    def __init__(
        self,
        ground_truth: Mapping[Any, Iterable[str]] | None = None,
        *,
        lemmatizer: str = "builtin",
        vocabulary: ChairVocabulary | None = None,
    ):
        self.lemmatizer_name = lemmatizer
        self._lemmas = get_lemmatizer(lemmatizer)
        self.vocabulary = vocabulary or ChairVocabulary.default()
        self.ground_truth = {k: set(v) for k, v in (ground_truth or {}).items()}

    @classmethod
    def from_coco(
        cls,
        instances: Mapping[Any, Iterable[str]],
        captions: Mapping[Any, Iterable[str]],
        **kwargs: Any,
    ) -> ChairScorer:
        """Ground truth per image = its instance categories (COCO names) and the objects its human
        captions name, read by the same lemmatiser (the de-facto scorer's rule)."""
        scorer = cls(**kwargs)
        synonyms = scorer.vocabulary.synonyms
        for image_id in set(instances) | set(captions):
            objects = set()
            for name in instances.get(image_id, ()):
                if name not in synonyms:
                    raise InvalidInputError(f"COCO category {name!r} of image {image_id} is not in CHAIR's vocabulary")
                objects.add(synonyms[name])
            for caption in captions.get(image_id, ()):
                objects.update(scorer.caption_objects(caption).objects)
            scorer.ground_truth[image_id] = objects
        return scorer

    def caption_objects(self, caption: str) -> CaptionObjects:
        lemmas = self._lemmas(caption)
        tokens: list[str] = []
        i = 0
        while i < len(lemmas):
            pair = " ".join(lemmas[i : i + 2])
            if i + 1 < len(lemmas) and pair in self.vocabulary.double_words:
                tokens.append(self.vocabulary.double_words[pair])
                i += 2
            else:
                tokens.append(lemmas[i])
                i += 1
        found = CaptionObjects(tokens)
        drop_seat = "toilet" in tokens and "seat" in tokens  # "the seat of the toilet" is no chair
        for position, token in enumerate(tokens):
            if token in self.vocabulary.synonyms and not (drop_seat and token == "seat"):
                found.words.append(token)
                found.objects.append(self.vocabulary.synonyms[token])
                found.positions.append(position)
        return found

    def score_caption(self, image_id: Any, caption: str) -> dict[str, Any]:
        """One caption's mentions and the counts :func:`chair_summary` adds up."""
        if image_id not in self.ground_truth:
            raise InvalidInputError(f"image {image_id} has no CHAIR ground truth (not in the annotations)")
        truth = self.ground_truth[image_id]
        found = self.caption_objects(caption)
        hallucinated = [(w, o) for w, o in zip(found.words, found.objects) if o not in truth]
        return {
            "mentions": [[w, o] for w, o in zip(found.words, found.objects)],
            "hallucinated": [[w, o] for w, o in hallucinated],
            "hallucinated_positions": [p for p, o in zip(found.positions, found.objects) if o not in truth],
            "ground_truth": sorted(truth),
            "recalled": sorted(set(found.objects) & truth),
            "length": len(found.tokens),
        }

    def score(self, captions: Iterable[tuple[Any, str]]) -> dict[str, Any]:
        per_caption = [self.score_caption(image_id, caption) for image_id, caption in captions]
        return {**chair_summary(per_caption), "captions": per_caption}


def chair_summary(per_caption: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """CHAIR_s, CHAIR_i, recall (percent) and mean length from :meth:`ChairScorer.score_caption` rows.
    With no object mentioned at all CHAIR_i is 0 (the scorer divides by zero)."""
    if not per_caption:
        raise InvalidInputError("no captions to score")
    mentions = sum(len(c["mentions"]) for c in per_caption)
    hallucinated = sum(len(c["hallucinated"]) for c in per_caption)
    truth = sum(len(c["ground_truth"]) for c in per_caption)
    return {
        "chair_s": _percent(sum(bool(c["hallucinated"]) for c in per_caption), len(per_caption)),
        "chair_i": _percent(hallucinated, mentions),
        "recall": _percent(sum(len(c["recalled"]) for c in per_caption), truth),
        "length": sum(c["length"] for c in per_caption) / len(per_caption),
        "mentions": mentions,
        "hallucinated_mentions": hallucinated,
        "n": len(per_caption),
    }
