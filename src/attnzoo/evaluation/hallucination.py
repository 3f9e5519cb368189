"""Object-hallucination benchmarks of LVLMs for ``attnzoo eval hallucination-mitigation``: POPE,
CHAIR and MME's perception subset (existence, count, position, color), with a method (none, var,
agla, ...) or several (``--methods none,var,agla``: one run per method on the same samples, then one
comparison table).

What moves the published numbers is recorded with every run (multimodal notes §2.1, §4): the
decoding (greedy or sampled, temperature, top-p, top-k, beams, max new tokens, seed), the prompt
(the question as sent: the POPE question + suffix, the CHAIR prompt, the MME question), the chat
template, the answer parser, the model revision and attention implementation, the method and its
settings, and the question / image list files (and CHAIR's COCO annotation files) with their
sha256. A run resumed with any of these changed is refused (``--overwrite`` starts over). Sampled
decoding seeds each sample from the run's seed and the sample's id, so a resumed or sharded run
draws exactly what one uninterrupted process draws.

Each answer is one line of ``predictions.jsonl`` with the answer text and what every parser read in
it; ``metrics.json`` holds the headline parser's scores and every other parser's beside them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from attnzoo._io import read_json, write_json, write_text
from attnzoo._values import comma_items, nonblank_text, whole_number
from attnzoo.errors import InvalidInputError, InvalidOptionError
from attnzoo.evaluation.runner import EvalPlan, EvalSample, TaskEvaluator, check_limit, format_metric

__all__ = [
    "BENCHMARKS",
    "PROMPT_SUFFIXES",
    "HallucinationEvaluator",
    "comparison_table",
    "decoding_settings",
    "sample_seed",
    "write_comparison_table",
]

TASK = "hallucination-mitigation"
BENCHMARKS = ("pope", "chair", "mme")
#: Named prompt suffixes. MME also has "released" (its questions as released). Anything else given to
#: ``--prompt-suffix`` that looks like a name (one token of a-z, 0-9, "-", "_") is refused; other text
#: is the suffix itself, after one space unless it starts with white space.
PROMPT_SUFFIXES = {
    "one-word": " Please answer this question with one word.",  # VCD, AGLA (POPE)
    "llava": "\nAnswer the question using a single word or phrase.",  # LLaVA-1.5's POPE / MME, lmms-eval
    "yes-no": " Please answer yes or no.",  # MME's released questions end with it
    "none": "",
}
MME_RELEASED_SUFFIX = " Please answer yes or no."
_DEFAULTS: dict[str, dict[str, Any]] = {
    "pope": {"split": "adversarial", "prompt_suffix": "one-word", "max_new_tokens": 64, "parser": "pope"},
    "chair": {"split": "val2014", "max_new_tokens": 512},
    "mme": {"split": "perception", "prompt_suffix": "released", "max_new_tokens": 64, "parser": "mme"},
}


def sample_seed(seed: int, sample_id: str) -> int:
    """The seed of one sample's sampled decoding: the same in every shard, resume and process count."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def decoding_settings(
    *,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The full decoding configuration with its defaults filled in: greedy unless ``do_sample`` (then
    temperature 1, top-p 1, no top-k unless given: the VCD / AGLA setting), one beam."""
    from attnzoo.pipelines.base import generator_seed

    sampled = bool(do_sample)
    if not sampled and any(v is not None for v in (temperature, top_p, top_k)):
        raise InvalidOptionError("--temperature, --top-p and --top-k apply to sampled decoding: add --do-sample")
    for name, value, low in (("max_new_tokens", max_new_tokens, 1), ("num_beams", num_beams, 1), ("top_k", top_k, 0)):
        if value is not None:  # the model's own bounds (context, vocabulary) are checked once its config is read
            whole_number(value, f"--{name.replace('_', '-')}", low=low)
    if seed is not None:  # the run command's range, refused before the model loads
        generator_seed(seed, "--seed")
    if temperature is not None and not 1e-4 <= temperature < math.inf:  # below, the scaled logits overflow
        raise InvalidOptionError(f"--temperature must be a finite number >= 1e-4, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InvalidOptionError(f"--top-p must be in (0, 1], got {top_p}")
    return {
        "mode": "sampled" if sampled else "beam" if (num_beams or 1) > 1 else "greedy",
        "do_sample": sampled,
        "temperature": (1.0 if temperature is None else float(temperature)) if sampled else None,
        "top_p": (1.0 if top_p is None else float(top_p)) if sampled else None,
        "top_k": top_k if sampled else None,
        "num_beams": num_beams or 1,
        "max_new_tokens": max_new_tokens,
        "seed": 0 if seed is None else int(seed),
    }


def _settings_taken(name: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a method (or a composition, "var+vcd") takes; "none" takes none."""
    from attnzoo.multimodal.hallucination.methods import method_settings, parse_method_spec

    accepted = {
        key
        for part, item in parse_method_spec(name)
        for key in method_settings(part)
        if not (isinstance(item, Mapping) and key in item)  # its own value, in its parentheses, wins
    }
    return {k: v for k, v in settings.items() if k in accepted}


def _refuse_ambiguous_settings(names: Sequence[str], settings: Mapping[str, Any]) -> None:
    """In a comparison, a setting that two of the compared methods read with different meanings (told by
    their different defaults: ``--alpha`` is VCD's contrast, 1, and PAI's attention boost, 0.2) is
    refused: one value would run one of them far from its own setting without a word."""
    from attnzoo.multimodal.hallucination.methods import parse_method_spec, setting_clashes

    clashes = setting_clashes([pair for name in names for pair in parse_method_spec(name)], settings)
    if clashes:
        said = "; ".join(
            f"--{k.replace('_', '-')} is read by {', '.join(f'{m} (default {v})' for m, v in d.items())}"
            for k, d in clashes.items()
        )
        raise InvalidOptionError(
            f"in --methods {','.join(names)} one value would go to methods that read it differently: {said}. "
            "Give each method its own in its parentheses (--methods 'none,pai(alpha=0.5),vcd(alpha=1)'), or run "
            "those methods separately (--method NAME with its own settings, each into its own --out) and compare "
            "the runs with attnzoo.evaluation.hallucination.write_comparison_table"
        )


def _describe_method(name: str, settings: Mapping[str, Any], decoding: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every setting of the method(s) as they will run, defaults included, as JSON values (what ``run.json``
    holds and a resumed run compares); an unknown method, or one that cannot decode as asked (a contrast
    branch with beam search), is refused here, before any model loads."""
    from attnzoo.multimodal.hallucination.methods import build_methods, decoding_refusal

    built = build_methods(name, strict=False, **settings)
    refusal = decoding_refusal(built, decoding["num_beams"])
    if refusal is not None:
        raise InvalidOptionError(f"method {name}: {refusal}")
    return json.loads(json.dumps([m.describe() for m in built], default=str))


def _sha256(path: Path | None) -> str | None:
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:  # COCO's train instances are ~450 MB: read in pieces
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _annotation_digests(paths: Sequence[Path], root: Path) -> dict[str, str | None]:
    """The sha256 of each annotation file read, by its path under ``root`` (the run's --data)."""
    return {(p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)): _sha256(p) for p in paths}


_SUFFIX_NAME = re.compile(r"[a-z0-9_-]+", flags=re.IGNORECASE)
_BENCHMARK_SUFFIXES = {"pope": tuple(PROMPT_SUFFIXES), "mme": ("released", *PROMPT_SUFFIXES)}


def _suffix(value: str | None, default: str, benchmark: str) -> str:
    """The text of a named suffix, or free text after one space (none added when it starts with white
    space); a name of no suffix of ``benchmark`` (a typo such as "one_word", or MME's "released" on
    POPE) is refused rather than asked as text glued to the question."""
    name = default if value is None else value
    if name in PROMPT_SUFFIXES:
        return PROMPT_SUFFIXES[name]
    valid = _BENCHMARK_SUFFIXES[benchmark]  # MME's "released" is read by its loader, before this
    owners = [b.upper() for b, names in _BENCHMARK_SUFFIXES.items() if name in names]
    if owners:
        raise InvalidOptionError(
            f"--prompt-suffix {name} is {' and '.join(owners)}'s only; for {benchmark.upper()} use one of "
            f"{', '.join(valid)}, or the text itself"
        )
    if _SUFFIX_NAME.fullmatch(name):
        raise InvalidOptionError(
            f"--prompt-suffix {name!r} names no suffix; the named suffixes of {benchmark.upper()} are "
            f"{', '.join(valid)} (text of your own has a space or punctuation, e.g. 'Answer {name}.')"
        )
    return name if not name or name[0].isspace() else " " + name


_NO_PAIRS = {"images": 0, "questions": 0, "incomplete_images": 0, "incomplete": []}


def _answer_text(result: Any) -> str:
    answer = getattr(result, "answer", result)
    if not isinstance(answer, str):
        raise InvalidInputError(f"the pipeline's result has no text answer (got {type(answer).__name__})")
    return answer


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value


class HallucinationEvaluator(TaskEvaluator):
    task = TASK
    headline = ("accuracy", "f1", "yes_ratio", "chair_s", "chair_i", "recall", "length", "total")

    @classmethod
    def plan(
        cls,
        data: str | os.PathLike,
        split: str | None,
        *,
        default_split: str = "adversarial",
        limit: int | None,
        model: str,
        weights: Any,
        log: Callable[[str], None] = print,
        benchmark: str | None = None,
        source: str | None = None,
        method: str | None = None,
        methods: str | None = None,
        parser: str | None = None,
        prompt: str | None = None,
        prompt_suffix: str | None = None,
        chat_template: str | None = None,
        questions: str | None = None,
        image_folder: str | None = None,
        image_list: str | None = None,
        chair_images: int | None = None,
        lemmatizer: str | None = None,
        subtasks: str | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        attn_implementation: str | None = None,
        revision: str | None = None,
        **method_settings: Any,
    ) -> EvalPlan:
        """One run per method (a sub-folder each when there are several); every run's settings hold
        the full decoding configuration, prompt, parser, data files and the method's settings."""
        benchmark = "pope" if benchmark is None else benchmark
        if benchmark not in BENCHMARKS:
            raise InvalidOptionError(f"--benchmark must be one of {', '.join(BENCHMARKS)}, got {benchmark!r}")
        texts = {"chat_template": chat_template, "attn_implementation": attn_implementation, "revision": revision}
        for name, value in texts.items():
            if value is not None:  # empty: not "the model's own"
                nonblank_text(value, "--" + name.replace("_", "-"))
        if method is not None and methods is not None:
            raise InvalidOptionError("give --method or --methods, not both")
        listed = methods if methods is not None else method
        from attnzoo.multimodal.hallucination.methods import canonical_spec

        flag = "--methods" if methods is not None else "--method"
        # one way of writing each (case, spaces, "baseline"): one run and one folder per method however typed
        names = ["none"] if listed is None else [canonical_spec(n) for n in comma_items(listed, flag, nested=True)]
        if len(set(names)) != len(names):
            raise InvalidOptionError(f"--methods lists each method once, got {listed!r}")
        decoding = decoding_settings(
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            num_beams=num_beams,
            max_new_tokens=_DEFAULTS[benchmark]["max_new_tokens"] if max_new_tokens is None else max_new_tokens,
            seed=seed,
        )
        model_settings = {
            "attn_implementation": attn_implementation,
            "revision": revision,
            "chat_template": chat_template,
        }
        common_kwargs = {
            **{k: v for k, v in decoding.items() if k not in ("mode", "seed") and v is not None},
            **{k: v for k, v in model_settings.items() if v is not None},
        }
        first = cls(
            data,
            split,
            benchmark=benchmark,
            source=source,
            limit=limit,
            parser=parser,
            prompt=prompt,
            prompt_suffix=prompt_suffix,
            questions=questions,
            image_folder=image_folder,
            image_list=image_list,
            chair_images=chair_images,
            lemmatizer=lemmatizer,
            subtasks=subtasks,
            seed=decoding["seed"],
            sampled=decoding["do_sample"],
        )
        runs: list[tuple[str | None, TaskEvaluator, dict[str, Any]]] = []
        taken = {name: _settings_taken(name, method_settings) for name in names}
        unused = sorted(set(method_settings) - {k for own in taken.values() for k in own})
        if unused and len(names) > 1:  # one method alone says so itself, naming what it takes
            raise InvalidOptionError(f"setting(s) {', '.join(unused)} are taken by none of --methods {','.join(names)}")
        if len(names) > 1:
            _refuse_ambiguous_settings(names, method_settings)
        for name in names:
            evaluator = copy.copy(first)  # the data is read once and shared by the methods' runs
            own = taken[name] if len(names) > 1 else dict(method_settings)  # recorded: the ones it takes
            evaluator.pipeline_kwargs = {**common_kwargs, "method": name, **own}
            if own and len(names) > 1:  # every method gets the settings; each takes the ones it has
                evaluator.pipeline_kwargs["unused_settings"] = "ignore"
            ran = {"method": name, "method_settings": own, "method_description": _describe_method(name, own, decoding)}
            runs.append((name if len(names) > 1 else None, evaluator, ran))
        first._cache["methods"] = [(name, run["method_settings"]) for name, _, run in runs]  # checked on the model
        settings = {
            **first.settings(),
            "decoding": decoding,
            **{k: v if v is not None else "model default" for k, v in model_settings.items()},
        }
        pipeline_kwargs = dict(runs[0][1].pipeline_kwargs or {}) if len(names) == 1 else common_kwargs
        return EvalPlan(model, first.split, runs, pipeline_kwargs, settings)

    def check_model(self, model: Any) -> None:
        """Every method of the plan on ``model`` (the methods of a comparison all run on it), before the first
        run answers: VAR without sink dimensions for this model would otherwise fail after the runs before it."""
        from attnzoo.multimodal.hallucination.methods import build_methods, check_on_model

        if self._cache.get("methods_checked_on") is model:
            return
        for name, settings in self._cache.get("methods", ()):
            check_on_model(build_methods(name, strict=False, **settings), model)
        self._cache["methods_checked_on"] = model

    def run_settings(self, pipe: Any, *, batch_size: int) -> dict[str, Any]:
        """What loaded and how the prompts were batched: the language model's attention implementation,
        the checkpoint's commit, the processor's own chat template (by hash) and the batch size (left
        padding changes the numbers), instead of "model default"."""
        settings: dict[str, Any] = {"batch_size": batch_size}
        model = getattr(pipe, "model", None)
        text_attention = getattr(pipe, "text_attention", None)
        if model is not None and callable(text_attention):
            settings["attn_implementation"] = text_attention(model)
        commit = getattr(getattr(model, "config", None), "_commit_hash", None)
        if commit:
            settings["revision"] = commit
        template = getattr(getattr(pipe, "processor", None), "chat_template", None)
        if isinstance(template, str):
            settings["processor_chat_template_sha256"] = hashlib.sha256(template.encode()).hexdigest()[:16]
        return settings

    @classmethod
    def summarize(cls, results: dict[Any, dict[str, Any]], out: Path) -> str:
        path = write_comparison_table(results, out)
        return f"wrote the comparison of {len(results)} methods to {path}"

    @classmethod
    def summary_files(cls, out: Path) -> tuple[Path, ...]:
        return (out / "comparison.md", out / "comparison.json")

    def __init__(
        self,
        data: str | os.PathLike,
        split: str | None = None,
        *,
        benchmark: str = "pope",
        source: str | None = None,
        limit: int | None = None,
        parser: str | None = None,
        prompt: str | None = None,
        prompt_suffix: str | None = None,
        questions: str | os.PathLike | None = None,
        image_folder: str | os.PathLike | None = None,
        image_list: str | os.PathLike | None = None,
        chair_images: int | None = None,
        lemmatizer: str | None = None,
        subtasks: str | Sequence[str] | None = None,
        seed: int = 0,
        sampled: bool = False,
    ):
        if benchmark not in BENCHMARKS:
            raise InvalidOptionError(f"--benchmark must be one of {', '.join(BENCHMARKS)}, got {benchmark!r}")
        check_limit(limit)
        texts = {
            "split": split,
            "source": source,
            "parser": parser,
            "prompt": prompt,
            "questions": questions,
            "image_folder": image_folder,
            "image_list": image_list,
            "lemmatizer": lemmatizer,
        }
        for name, value in texts.items():
            if value is not None:  # an empty one would read as "not given" (the default) or the current folder
                nonblank_text(
                    os.fspath(value) if isinstance(value, os.PathLike) else value, "--" + name.replace("_", "-")
                )
        if chair_images is not None:
            whole_number(chair_images, "--chair-images")
        defaults = _DEFAULTS[benchmark]
        self.benchmark, self.limit, self.seed, self.sampled = benchmark, limit, seed, sampled
        self.split: str = split or defaults["split"]  # POPE's: its question file's, when its name says one
        self.pipeline_kwargs: dict[str, Any] = {}
        self._extra: dict[str, Any] = {}
        self.dataset: Any = None  # PopeDataset or ChairDataset
        self.questions: list[Any] = []  # MME's
        self.parser: str | None = None
        self.suffix: str | None = None
        self._cache: dict[str, Any] = {}  # shared by the copies of one plan (one per method)
        given = {
            "source": source,
            "questions": questions,
            "image_list": image_list,
            "chair_images": chair_images,
            "lemmatizer": lemmatizer,
            "subtasks": subtasks,
            "prompt": prompt,
        }
        allowed = {
            "pope": {"source", "questions", "prompt"},
            "chair": {"image_list", "chair_images", "lemmatizer", "prompt"},
            "mme": {"subtasks", "prompt"},
        }[benchmark]
        wrong = sorted(k for k, v in given.items() if v is not None and k not in allowed)
        if wrong:
            raise InvalidOptionError(
                f"{', '.join('--' + w.replace('_', '-') for w in wrong)} do not apply to --benchmark {benchmark}"
            )
        if benchmark == "chair" and (parser is not None or prompt_suffix is not None):
            raise InvalidOptionError(
                "CHAIR scores free captions: --parser and --prompt-suffix do not apply (use --prompt)"
            )
        if benchmark == "pope":
            self._load_pope(data, split, source, questions, image_folder, parser, prompt, prompt_suffix)
        elif benchmark == "chair":
            self._load_chair(data, image_list, chair_images, lemmatizer, prompt, image_folder)
        else:
            self._load_mme(data, subtasks, parser, prompt, prompt_suffix, image_folder)

    # -- data --------------------------------------------------------------------------------------
    def _load_pope(self, data, split, source, questions, image_folder, parser, prompt, prompt_suffix) -> None:
        from attnzoo.datasets.pope import POPE_SPLITS, PopeDataset
        from attnzoo.metrics.hallucination import POPE_PARSERS

        if split is not None and split not in POPE_SPLITS:
            raise InvalidOptionError(f"POPE's --split is one of {', '.join(POPE_SPLITS)}, got {split!r}")
        self.parser = parser or _DEFAULTS["pope"]["parser"]
        if self.parser not in POPE_PARSERS:
            raise InvalidOptionError(f"--parser for POPE is one of {', '.join(POPE_PARSERS)}, got {self.parser!r}")
        if prompt is not None:
            raise InvalidOptionError("POPE asks its own questions: --prompt does not apply (use --prompt-suffix)")
        self.dataset = PopeDataset.from_root(data, source, split, questions=questions, images=image_folder)
        self.split = self.dataset.split  # a question file's name says its split and source
        self.suffix = _suffix(prompt_suffix, _DEFAULTS["pope"]["prompt_suffix"], "pope")
        self._extra = {
            "source": self.dataset.source,
            "questions": str(self.dataset.question_file.resolve()),
            "questions_sha256": _sha256(self.dataset.question_file),
            "images": str(self.dataset.image_folder.resolve()),
            "parser": self.parser,
            "prompt_template": "{question}{suffix}",
            "prompt_suffix": self.suffix,
        }

    def _load_chair(self, data, image_list, chair_images, lemmatizer, prompt, image_folder) -> None:
        from attnzoo.datasets.chair import CHAIR_PROMPT, ChairDataset
        from attnzoo.metrics.hallucination import get_lemmatizer

        if image_folder is not None:
            raise InvalidOptionError("CHAIR reads its images from <data>/val2014: --image-folder does not apply")
        if image_list is not None and chair_images is not None:  # the list would win without a word
            raise InvalidOptionError(
                "--chair-images draws a seeded sample of the split; --image-list names the images: give one "
                "(--limit N captions the first N images of the list)"
            )
        if self.split not in ("val2014", "train2014", "val2017", "train2017"):
            raise InvalidOptionError(f"CHAIR's --split is a COCO split (val2014 by default), got {self.split!r}")
        self.lemmatizer = lemmatizer or "nltk"
        get_lemmatizer(self.lemmatizer)  # a missing nltk or its data is refused before the model loads
        self.dataset = ChairDataset.from_root(
            data, list_file=image_list, count=chair_images or 500, seed=self.seed, split=self.split
        )
        self.prompt = prompt
        listed = {im.prompt for im in self.dataset.images} - {None}
        if prompt is None and len(listed) > 1:
            raise InvalidOptionError(f"the image list asks {len(listed)} different prompts; choose one with --prompt")
        self.prompt = prompt or (listed.pop() if listed else CHAIR_PROMPT)
        self._extra = {
            "images": str(self.dataset.image_folder.resolve()),
            "image_list": str(Path(image_list).resolve()) if image_list else None,
            "image_list_sha256": _sha256(self.dataset.list_file),
            "chair_images": len(self.dataset.images),
            "chair_sample_seed": None if image_list else self.seed,
            "image_ids_sha256": hashlib.sha256(
                ",".join(str(im.image_id) for im in self.dataset.images).encode()
            ).hexdigest(),
            # the ground truth every caption is scored against: a resume over edited annotations is refused
            "annotations_sha256": _annotation_digests(self.dataset.annotations.sources, Path(data)),
            "lemmatizer": self.lemmatizer,
            "prompt_template": "{prompt}",
            "prompt": self.prompt,
        }

    def _load_mme(self, data, subtasks, parser, prompt, prompt_suffix, image_folder) -> None:
        from attnzoo.datasets.mme import MME_HALLUCINATION_SUBTASKS, read_mme
        from attnzoo.metrics.hallucination import MME_PARSERS

        if image_folder is not None or prompt is not None:
            raise InvalidOptionError(
                "MME asks its own questions on its own images: --prompt / --image-folder do not apply"
            )
        if self.split != "perception":
            raise InvalidOptionError(
                f"MME's --split is 'perception' (choose subtasks with --subtasks), got {self.split!r}"
            )
        self.parser = parser or _DEFAULTS["mme"]["parser"]
        if self.parser not in MME_PARSERS:
            raise InvalidOptionError(f"--parser for MME is one of {', '.join(MME_PARSERS)}, got {self.parser!r}")
        if subtasks is None:
            names = list(MME_HALLUCINATION_SUBTASKS)
        elif isinstance(subtasks, str):
            names = comma_items(subtasks, "--subtasks")
        else:
            names = [nonblank_text(s, "--subtasks").strip() for s in subtasks]
        if not names:
            raise InvalidOptionError("--subtasks names no subtask")
        self.subtasks = list(dict.fromkeys(names))  # each once, in order
        self.questions = read_mme(data, self.subtasks)
        asked = [(q.subtask, q.image_key, q.index, q.question, q.answer) for q in self.questions]
        released = prompt_suffix in (None, "released")
        self.suffix = None if released else _suffix(prompt_suffix, "none", "mme")
        self._extra = {
            "mme_subtasks": self.subtasks,
            # the questions and answers as read (subtask, image, line, question, answer): edited data is seen
            "questions_sha256": hashlib.sha256(json.dumps(asked).encode()).hexdigest(),
            "parser": self.parser,
            "prompt_template": "{question}" if released else "{question without ' Please answer yes or no.'}{suffix}",
            "prompt_suffix": "as released" if released else self.suffix,
        }

    def settings(self) -> dict[str, Any]:
        """What this evaluator adds to ``run.json`` (the data files, prompt and parser)."""
        return {"benchmark": self.benchmark, **self._extra}

    # -- the runner's protocol -----------------------------------------------------------------------
    def _input(self, sample_id: str, image: Path, question: str) -> dict[str, Any]:
        from attnzoo.datasets.images import dataset_image_path

        # decoded as stored, as the official evaluations (PIL's open, no EXIF rotation) did
        item: dict[str, Any] = {"image": dataset_image_path(image), "question": question}
        if self.sampled:
            item["seed"] = sample_seed(self.seed, sample_id)
        return item

    def samples(self) -> list[EvalSample]:
        """``--limit N``: the first N questions (POPE), images (CHAIR) or images of each subtask (MME, both
        questions each)."""
        out = []
        if self.benchmark == "pope":
            for q in self.dataset.questions[: self.limit]:
                sid = f"{self.split}/{q.question_id}"
                out.append(EvalSample(sid, self._input(sid, self.dataset.image_path(q), q.text + self.suffix), q))
        elif self.benchmark == "chair":
            for im in self.dataset.images[: self.limit]:
                sid = str(im.image_id)
                out.append(EvalSample(sid, self._input(sid, self.dataset.image_path(im), self.prompt), im))
        else:
            keep: set[tuple[str, str]] = set()
            for subtask in self.subtasks:
                keep |= set(
                    list(dict.fromkeys((q.subtask, q.image_key) for q in self.questions if q.subtask == subtask))[
                        : self.limit
                    ]
                )
            for q in self.questions:
                if (q.subtask, q.image_key) not in keep:
                    continue
                sid = f"{q.subtask}/{q.image_key}/{q.index}"
                text = q.question if self.suffix is None else q.question.replace(MME_RELEASED_SUFFIX, "") + self.suffix
                out.append(EvalSample(sid, self._input(sid, q.image, text), q))
        return out

    def scorer(self) -> Any:
        """CHAIR's scorer with the ground truth of the chosen images (built on first use)."""
        if "scorer" not in self._cache:
            from attnzoo.metrics.hallucination import ChairScorer

            instances, captions = self.dataset.ground_truth_inputs()
            self._cache["scorer"] = ChairScorer.from_coco(instances, captions, lemmatizer=self.lemmatizer)
        return self._cache["scorer"]

    def record(self, sample: EvalSample, result: Any) -> dict[str, Any]:
        from attnzoo.metrics.hallucination import MME_PARSERS, POPE_PARSERS, parse_mme_answer, parse_pope_answer

        answer = _answer_text(result)
        target = sample.target
        if self.benchmark == "pope":
            return {
                "image": target.image,
                "question": sample.input["question"],
                "answer": answer,
                "label": target.label,
                "parsed": {p: parse_pope_answer(answer, p, target.label) for p in POPE_PARSERS},
            }
        if self.benchmark == "chair":
            return {
                "image_id": target.image_id,
                "answer": answer,
                **self.scorer().score_caption(target.image_id, answer),
            }
        return {
            "subtask": target.subtask,
            "image": target.image_key,
            "question": sample.input["question"],
            "answer": answer,
            "label": target.answer,
            "parsed": {p: parse_mme_answer(answer, p) for p in MME_PARSERS},
        }

    def metrics(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        from attnzoo.metrics.hallucination import chair_summary, mme_scores, pope_metrics

        if self.benchmark == "pope":
            labels = [r["label"] for r in records]
            rows = {p: pope_metrics([r["parsed"][p] for r in records], labels) for p in records[0]["parsed"]}
            return _rounded({**rows[self.parser], "parser": self.parser, "parsers": rows})
        if self.benchmark == "chair":
            return _rounded({**chair_summary(records), "lemmatizer": self.lemmatizer})
        by_parser = {}
        for p in records[0]["parsed"]:
            per_subtask = mme_scores((r["subtask"], r["image"], r["label"], r["parsed"][p]) for r in records)
            for name in self.subtasks:  # every question of it skipped: no score (n/a), not a score of 0
                per_subtask.setdefault(name, {**dict.fromkeys(("acc", "acc_plus", "score"), math.nan), **_NO_PAIRS})
            by_parser[p] = {"subtasks": per_subtask, "total": sum(s["score"] for s in per_subtask.values())}
        return _rounded({**by_parser[self.parser], "parser": self.parser, "parsers": by_parser})

    def report(self, metrics: dict[str, Any]) -> str:
        lines = [f"Benchmark: **{_benchmark_title(metrics)}**", ""]
        lines += [f"- **{k}**: {v}" for k, v in _setting_lines(metrics)]
        lines += ["", _table([(_row_name(metrics), metrics)], metrics["benchmark"], metrics.get("subtasks"))]
        if metrics["benchmark"] == "mme":
            lines += ["", "| subtask | acc | acc+ | score | images |", "|---|---|---|---|---|"]
            lines += [
                f"| {name} | {_fmt(row['acc'])} | {_fmt(row['acc_plus'])} | {_fmt(row['score'])} | {row['images']} |"
                for name, row in metrics["subtasks"].items()
            ]
            incomplete = {n: row.get("incomplete") or [] for n, row in metrics["subtasks"].items()}
            if any(incomplete.values()):
                count = sum(map(len, incomplete.values()))
                named = "; ".join(f"{n}: {', '.join(images)}" for n, images in incomplete.items() if images)
                lines += [
                    "",
                    f"**{count} image(s) had one of their two questions skipped** and are left out of acc, acc+ "
                    f"and the score (MME scores pairs): {named}.",
                ]
        if metrics["benchmark"] in ("pope", "mme"):
            others = [(f"parser {p}", m) for p, m in metrics["parsers"].items() if p != metrics["parser"]]
            lines += [
                "",
                "The same answers under the other parsers:",
                "",
                _table(others, metrics["benchmark"], metrics.get("subtasks")),
            ]
        lines += ["", _NOTES[metrics["benchmark"]]]
        return "\n".join(lines) + "\n"


# -- reports and the comparison table --------------------------------------------------------------
_NOTES = {
    "pope": "Percent. Parsers: pope = POPE's evaluate.py (first sentence, exact No/no/not); opera = OPERA/PAI "
    "(whole answer, also NO and n't); vcd = VCD/AGLA (label-dependent substring); strict = exactly one of the "
    "words yes/no, else unparsed (counted wrong).",
    "chair": "CHAIR_s: captions with a hallucinated object; CHAIR_i: hallucinated object mentions; recall: "
    "ground-truth objects mentioned (percent); Len: mean tokens per caption (punctuation included).",
    "mme": "Per subtask acc + acc+ (each out of 100, so out of 200); acc+: images with both questions right.",
}
_COLUMNS = {
    "pope": [
        ("Accuracy", "accuracy"),
        ("Precision", "precision"),
        ("Recall", "recall"),
        ("F1", "f1"),
        ("Yes-ratio", "yes_ratio"),
        ("Unparsed", "unparsed"),
    ],
    "chair": [("CHAIR_s", "chair_s"), ("CHAIR_i", "chair_i"), ("Recall", "recall"), ("Len", "length")],
}


def _fmt(value: Any) -> str:
    """A table cell: a count as it is, a rate or score to two decimals, ``n/a`` where none could be computed."""
    return format_metric(value, ".2f") if value is None or isinstance(value, float) else str(value)


def _table(rows: Sequence[tuple[str, Mapping[str, Any]]], benchmark: str, subtasks: Mapping[str, Any] | None) -> str:
    if benchmark == "mme":
        names = list(subtasks or {})
        head = "| | " + " | ".join(names) + " | total |\n|---|" + "---|" * (len(names) + 1) + "\n"
        body = "".join(
            f"| {name} | "
            + " | ".join(_fmt(m["subtasks"].get(s, {}).get("score")) for s in names)
            + f" | {_fmt(m['total'])} |\n"
            for name, m in rows
        )
        return head + body
    cols = _COLUMNS[benchmark]
    head = "| | " + " | ".join(c for c, _ in cols) + " | n |\n|---|" + "---|" * (len(cols) + 1) + "\n"
    return head + "".join(
        f"| {name} | " + " | ".join(_fmt(m.get(k)) for _, k in cols) + f" | {m.get('n', '')} |\n" for name, m in rows
    )


def _benchmark_title(metrics: Mapping[str, Any]) -> str:
    if metrics["benchmark"] == "pope":
        return f"POPE {metrics.get('source', '')} {metrics.get('split', '')}".strip()
    if metrics["benchmark"] == "chair":
        scored, listed = metrics.get("n", "?"), metrics.get("chair_images")
        images = f"{scored} of {listed}" if listed not in (None, scored) else f"{scored}"
        return f"CHAIR ({images} images, lemmatiser {metrics.get('lemmatizer')})"
    return f"MME ({', '.join(metrics.get('mme_subtasks') or metrics.get('subtasks', {}))})"


def _decoding_text(decoding: Mapping[str, Any] | None) -> str:
    if not decoding:
        return "not recorded"
    if decoding.get("do_sample"):
        top_k = f", top-k {decoding['top_k']}" if decoding.get("top_k") is not None else ""
        mode = f"sampled (temperature {decoding['temperature']}, top-p {decoding['top_p']}{top_k})"
    else:
        mode = decoding.get("mode", "greedy")
    return f"{mode}, {decoding.get('num_beams', 1)} beam(s), max {decoding.get('max_new_tokens')} new tokens, seed {decoding.get('seed')}"


def _setting_lines(metrics: Mapping[str, Any]) -> list[tuple[str, Any]]:
    keys = (
        "method_settings",
        "method_description",
        "parser",
        "lemmatizer",
        "attn_implementation",
        "revision",
        "chat_template",
    )
    out: list[tuple[str, Any]] = [
        ("method", metrics.get("method", "none")),
        ("decoding", _decoding_text(metrics.get("decoding"))),
    ]
    out += [(k, metrics[k]) for k in keys if metrics.get(k) not in (None, {}, [])]
    for key in ("prompt", "prompt_suffix"):
        if key in metrics:
            out.append((key, f"`{json.dumps(metrics[key])}`"))
    return out


def _row_name(metrics: Mapping[str, Any]) -> str:
    return str(metrics.get("method") or "none")


def comparison_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per method (the columns the papers report), from each run's metrics; the runs must be of
    one benchmark, and every setting that differs between them (other than the method) is listed."""
    if not results:
        raise InvalidInputError("no runs to compare")
    runs = list(results.items())
    benchmarks = {m.get("benchmark") for _, m in runs}
    if len(benchmarks) != 1 or None in benchmarks:
        raise InvalidInputError(f"runs of different benchmarks cannot share a table: {sorted(map(str, benchmarks))}")
    benchmark = benchmarks.pop()
    first = runs[0][1]
    rows = [(str(m.get("method") or name), m) for name, m in runs]
    text = [f"# {_benchmark_title(first)}: methods compared", ""]
    shared = ("method", "method_settings", "method_description")
    text += [f"- **{k}**: {v}" for k, v in _setting_lines(first) if k not in shared]
    text += ["", _table(rows, str(benchmark), first.get("subtasks")), ""]
    ignored = {
        "method",
        "method_settings",
        "method_description",
        "n",
        "skipped",
        "skipped_inputs",
        "seconds_this_run",
        "parsers",
        "subtasks",
        "total",
    }
    ignored |= {c for cols in _COLUMNS.values() for _, c in cols} | {
        "tp",
        "fp",
        "tn",
        "fn",
        "mentions",
        "hallucinated_mentions",
    }
    differ = sorted(k for _, m in runs for k in m if k not in ignored and m.get(k) != first.get(k))
    if differ:
        text += [
            f"**Warning**: the runs differ in {', '.join(dict.fromkeys(differ))}: the rows are not comparable.",
            "",
        ]
    settings = {name: m.get("method_settings") or {} for name, m in rows}
    if any(settings.values()):
        text += ["Method settings: " + "; ".join(f"{n}: {json.dumps(s)}" for n, s in settings.items()), ""]
    return "\n".join(text)


def write_comparison_table(
    runs: Mapping[str, Mapping[str, Any]] | Sequence[str | os.PathLike], out: str | os.PathLike
) -> Path:
    """Write ``comparison.md`` and ``comparison.json`` into ``out`` from several runs: their metrics by
    name, or run folders / ``metrics.json`` paths (named by their method). Returns the Markdown path."""
    if isinstance(runs, Mapping):
        results = dict(runs)
    else:
        results = {}
        for item in runs:
            path = Path(item)
            metrics = read_json(path / "metrics.json" if path.is_dir() else path, "an evaluation's metrics.json")
            name = str(metrics.get("method") or path.name)
            if name in results:
                raise InvalidInputError(f"two runs of method {name!r} in the comparison")
            results[name] = metrics
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "comparison.json", {str(k): v for k, v in results.items()})
    write_text(out / "comparison.md", comparison_table({str(k): v for k, v in results.items()}))
    return out / "comparison.md"
