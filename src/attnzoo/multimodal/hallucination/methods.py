"""The method registry of ``pipeline("hallucination-mitigation", method=...)``: names to classes
(imported on first use), keyword settings routed to the methods that take them, and the rules for
combining methods.

    build_methods("var")                                  # [VAR adapter]
    build_methods("var+agla", alpha=2)                    # alpha goes to AGLA (VAR has none)
    build_methods({"pai": {"alpha": 0.5}, "vcd": {}})     # settings per method
    build_methods("pai(alpha=0.5)+vcd(alpha=1)")          # the same in text (the command line's --method)
    build_methods([VAR(sink_dims=(3, 7)), "vcd"])         # instances as they are

A keyword setting that two methods of a composition read differently (``alpha``: PAI's attention
boost, default 0.2, and VCD's contrast, default 1) is refused: one value would run one of them far
from its own setting without a word. Give each method its own, in its parentheses or dict. A keyword
setting that every method taking it sets in its own parentheses or dict is refused too (it would go
nowhere while the run recorded it).

VAR, PAI and PAINT are :class:`~.base.Intervention` s; :class:`InterventionMethod` gives them the
:class:`~.method.MitigationMethod` shape (PAI and PAINT with their classifier-free-guidance processor
when ``gamma != 1``). Which methods combine (:func:`check_composition`):

- at most one attention edit (VAR, PAI, PAINT): two would each replace the language model's attention;
- at most one contrast method (VCD, AGLA): each takes the scores it is given as the original image's
  logits, so a second would contrast against the first one's output (and at most one method may run
  its branch as rows of the main ``generate``, :meth:`~.method.MitigationMethod.paired_contrast`);
- at most one method that rewrites the prompts (CARVE), and not with an attention edit: CARVE's probes
  read the stock model's attention to choose the crop;
- anything else combines: an attention edit with a contrast method (VAR + AGLA, PAI + VCD), CARVE with
  a contrast method (the contrast runs on CARVE's final prompt; AGLA only with CARVE's paper behaviour,
  whose final prompts hold one image).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from attnzoo._values import comma_items
from attnzoo.errors import InvalidOptionError

from .base import AttentionEdit, Intervention, InterventionConflictError
from .method import MitigationMethod, PromptBatch
from .pai import check_cfg_cutoff, check_gamma

__all__ = [
    "METHODS",
    "InterventionMethod",
    "MethodEntry",
    "build_methods",
    "canonical_spec",
    "check_composition",
    "check_on_model",
    "composition_name",
    "decoding_refusal",
    "index_span",
    "method_names",
    "method_settings",
    "parse_method_spec",
    "refuse_shared_settings",
    "setting_clashes",
    "setting_default",
    "spelled_span",
]

_PACKAGE = __name__.rpartition(".")[0]
ATTENTION, CONTRAST, PREPARE = "attention edit", "contrast", "prompt rewrite"


@dataclass(frozen=True)
class MethodEntry:
    """One registered method: its class (``module:attr``, imported on first use) and its kind."""

    name: str
    module: str
    attr: str
    kind: str
    #: The adapter adds PAI's CFG processor (``gamma``, ``cutoff``) to the intervention.
    cfg: bool = False

    def load(self) -> type:
        try:
            return getattr(importlib.import_module(self.module), self.attr)
        except (ImportError, AttributeError) as err:
            raise InvalidOptionError(
                f"the {self.name} method cannot be loaded ({self.module}.{self.attr}: {err})"
            ) from err

    def settings(self) -> tuple[str, ...]:
        """The keyword settings the method takes (the class's, plus ``gamma``/``cutoff`` for the CFG)."""
        names = _keywords(self.load())
        return (*names, "gamma", "cutoff") if self.cfg else names

    def build(self, **settings: Any) -> MitigationMethod:
        cls = self.load()
        settings = {k: _coerced(cls, k, v, self.name) for k, v in settings.items()}
        if self.cfg:
            guidance = {k: settings.pop(k) for k in ("gamma", "cutoff") if k in settings}
            return InterventionMethod(cls(**settings), **guidance)
        built = cls(**settings)
        return InterventionMethod(built) if isinstance(built, Intervention) else built


METHODS: dict[str, MethodEntry] = {
    "var": MethodEntry("var", f"{_PACKAGE}.var", "VAR", ATTENTION),
    "pai": MethodEntry("pai", f"{_PACKAGE}.pai", "PAI", ATTENTION, cfg=True),
    "paint": MethodEntry("paint", f"{_PACKAGE}.paint", "PAINT", ATTENTION, cfg=True),
    "vcd": MethodEntry("vcd", f"{_PACKAGE}.vcd", "VCD", CONTRAST),
    "agla": MethodEntry("agla", f"{_PACKAGE}.agla", "AGLA", CONTRAST),
    "carve": MethodEntry("carve", f"{_PACKAGE}.carve", "CARVE", PREPARE),
}
_NONE = ("", "none", "baseline", "stock")


#: The settings PAI's and PAINT's guidance adapter takes, and their types.
_CFG_SETTINGS = {"gamma": "float | None", "cutoff": "float | None"}


def _coerced(cls: type, name: str, value: Any, method: str) -> Any:
    """A setting given as text (the command line's ``--sink-dims 1415,2533``, a method's parentheses
    ``pai(alpha=0.5)``) as the type the method takes: a list of numbers, a number, a flag or None."""
    if not isinstance(value, str):
        return value
    parameter = inspect.signature(cls).parameters.get(name)
    annotation = _CFG_SETTINGS.get(name) or str(getattr(parameter, "annotation", ""))
    types = set(re.findall(r"[A-Za-z_.]+", annotation))
    if "None" in types and value.strip().lower() == "none":
        return None
    if any(t in annotation for t in ("Sequence", "Iterable", "tuple[", "list[")):
        numbers: list[float | int] = []
        for item in comma_items(value, name):
            span = index_span(item, f"{method}'s {name}")
            if span is not None:  # "1-3", as attention_layers takes it
                numbers += spelled_span(span, item, f"{method}'s {name}")
                continue
            try:
                numbers.append(float(item) if "." in item else int(item))
            except ValueError:
                raise InvalidOptionError(
                    f"{method}'s {name} must be numbers separated by commas (whole numbers may be ranges such as "
                    f"1-3), got {value!r}"
                ) from None
        return numbers
    text = value.strip()
    if "bool" in types:
        flags = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if text.lower() in flags:
            return flags[text.lower()]
        raise InvalidOptionError(f"{method}'s {name} must be true or false, got {value!r}")
    for kind, convert in (("int", int), ("float", float)):
        if kind in types:
            try:
                return convert(text)
            except ValueError:
                raise InvalidOptionError(
                    f"{method}'s {name} must be {'a whole number' if kind == 'int' else 'a number'}, got {value!r}"
                ) from None
    return value


_SPAN = re.compile(r"\s*(-?\d+)\s*-\s*(-?\d+)\s*")
#: The most indices one range of a setting may spell out (``"0-30000000"`` is a typo, not a list of layers).
MAX_SPAN = 10_000


def index_span(text: str, name: str) -> tuple[int, int] | None:
    """``(low, high)`` of a range of whole numbers written ``"10-12"`` (``"-3--1"``: negative ends), or None for
    text that is no range; one that runs backwards (``"3-1"``, which would name nothing) or whose ends count
    from different ends (``"-1-20"``) is refused, naming ``name``. Shared by the method settings written as text and the pipeline's ``attention_layers``."""
    match = _SPAN.fullmatch(text)
    if match is None:
        return None
    low, high = int(match.group(1)), int(match.group(2))
    if (low < 0) != (high < 0):  # counted from both ends: "-1-20" and "20--1" name no one run of layers
        raise InvalidOptionError(
            f"{name}: the range {text.strip()!r} mixes a count from the end with one from the start; write both "
            "ends from the start (20-31) or both from the end (-12--1)"
        )
    if high < low:
        raise InvalidOptionError(f"{name}: the range {text.strip()!r} runs backwards; write {high}-{low}")
    return low, high


def spelled_span(span: tuple[int, int], text: str, name: str) -> list[int]:
    """The numbers of ``span`` (:func:`index_span`'s), refused, naming ``name``, past :data:`MAX_SPAN` of them."""
    low, high = span
    if high - low + 1 > MAX_SPAN:
        raise InvalidOptionError(
            f"{name}: the range {text.strip()!r} spans {high - low + 1:,} numbers, more than any setting takes "
            f"({MAX_SPAN:,})"
        )
    return list(range(low, high + 1))


def _keywords(fn: Any) -> tuple[str, ...]:
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self")


def method_names() -> list[str]:
    return list(METHODS)


def method_settings(name: str) -> tuple[str, ...]:
    """The keyword settings of a registered method."""
    return _entry(name).settings()


def _entry(name: str) -> MethodEntry:
    entry = METHODS.get(name.strip().lower())
    if entry is None:
        raise InvalidOptionError(f"unknown method {name!r}; the methods are: none, {', '.join(METHODS)}")
    return entry


class InterventionMethod(MitigationMethod):
    """An :class:`~.base.Intervention` (VAR, PAI, PAINT) as a method: attached while ``generate`` runs,
    with PAI's CFG processor for each batch when ``gamma`` is set and not 1."""

    def __init__(self, intervention: Intervention, *, gamma: float | None = None, cutoff: float | None = None):
        if not isinstance(intervention, Intervention):
            raise InvalidOptionError(f"InterventionMethod wraps an Intervention, got {type(intervention).__name__}")
        if (gamma is not None or cutoff is not None) and not hasattr(intervention, "cfg_processor"):
            raise InvalidOptionError(
                f"{intervention.method} has no classifier-free guidance: gamma/cutoff do not apply"
            )
        defaults = _cfg_defaults(intervention)
        self.intervention = intervention
        self.name = intervention.method
        named = intervention.method.upper()
        self.gamma = defaults.get("gamma") if gamma is None else check_gamma(gamma, named)
        self.cutoff = defaults.get("cutoff") if cutoff is None else check_cfg_cutoff(cutoff, named)

    @property
    def guided(self) -> bool:
        return self.gamma is not None and self.gamma != 1.0

    def interventions(self) -> list[Intervention]:
        return [self.intervention]

    def logits_processors(self, model, processor, batch: PromptBatch) -> list:
        if not self.guided:
            return []
        return [self.intervention.cfg_processor(batch.inputs, self.gamma, cutoff=self.cutoff)]  # type: ignore[attr-defined]

    def describe(self) -> dict[str, Any]:
        described = self.intervention.describe()
        if self.gamma is not None:
            described.update(gamma=self.gamma, cutoff=self.cutoff, cfg="on" if self.guided else "off (gamma 1)")
        return described


def _cfg_defaults(intervention: Intervention) -> dict[str, float]:
    """The official CFG strength of PAI (1.1) or PAINT (2, its CHAIR script) and PAI's cutoff (0.1)."""
    if not hasattr(intervention, "cfg_processor"):
        return {}
    module = importlib.import_module(type(intervention).__module__)
    from .pai import DEFAULTS as PAI_DEFAULTS

    defaults = getattr(module, "DEFAULTS", PAI_DEFAULTS)
    return {"gamma": float(defaults.get("gamma", PAI_DEFAULTS["gamma"])), "cutoff": float(PAI_DEFAULTS["cutoff"])}


def parse_method_spec(spec: Any) -> list[tuple[str, Any]]:
    """``(name, item)`` pairs of a method spec: ``item`` is a settings dict for a registered name, or the
    method instance itself. None, "none" and [] are no method ("" is refused: a typo or an unset variable)."""
    if spec is None or isinstance(spec, (MitigationMethod, Intervention)):
        spec = [] if spec is None else [spec]
    if isinstance(spec, str):  # "" or "var++agla" would run something other than what was typed
        if not spec.strip():
            raise InvalidOptionError("method is empty: name one (var, var+agla), or 'none' for the stock model")
        try:
            items = comma_items(spec, "method", separators="+,", nested=True)
        except InvalidOptionError as err:
            if "parenthesis" in str(err):
                raise
            raise InvalidOptionError(
                f"method {spec!r} has a blank item; join method names with + or commas, e.g. 'var+agla'"
            ) from None
        spec = [_named_settings(item) for item in items]
    if isinstance(spec, Mapping):
        pairs = []
        for name, settings in spec.items():
            if settings is not None and not isinstance(settings, Mapping):
                raise InvalidOptionError(f"method settings for {name!r} must be a dict, got {type(settings).__name__}")
            pairs.append((str(name), dict(settings or {})))
        spec = pairs
    if not isinstance(spec, Iterable):
        raise InvalidOptionError(f"method must be a name, a list of names or methods, or a dict; got {spec!r}")
    out: list[tuple[str, Any]] = []
    for item in spec:
        if isinstance(item, tuple) and len(item) == 2:
            name, settings = item
        elif isinstance(item, (MitigationMethod, Intervention)):
            name, settings = _name_of(item), item
        elif isinstance(item, str):
            name, settings = item, {}
        else:
            raise InvalidOptionError(f"a method is a name or a MitigationMethod, got {type(item).__name__}")
        name = name.strip().lower()
        if name in _NONE and not isinstance(settings, (MitigationMethod, Intervention)):
            if settings:
                raise InvalidOptionError(f"method {name!r} (the stock model) takes no settings, got {dict(settings)}")
            continue
        if isinstance(settings, Mapping):
            _entry(name)
        out.append((name, settings))
    return out


_NAMED = re.compile(r"\s*([A-Za-z0-9_-]*)\s*(?:\((.*)\))?\s*", re.DOTALL)
_KEY = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=(.*)", re.DOTALL)


def _named_settings(item: str) -> tuple[str, dict[str, str]]:
    """``"pai(alpha=0.5, gamma=1)"`` -> ``("pai", {"alpha": "0.5", "gamma": "1"})``; a list value keeps its
    commas (``carve(layers=20,21,22)``: an item without ``=`` continues the setting before it)."""
    match = _NAMED.fullmatch(item)
    if match is None or not match.group(1):
        raise InvalidOptionError(
            f"method {item!r} is not a name, or a name with its settings in parentheses, e.g. 'pai(alpha=0.5)'"
        )
    name, inside = match.group(1), match.group(2)
    settings: dict[str, str] = {}
    if inside is None or not inside.strip():
        return name, settings
    key = None
    for part in comma_items(inside, f"{name}'s settings", nested=True, strip=False):
        setting = _KEY.fullmatch(part)
        if setting is None:
            if key is None:
                raise InvalidOptionError(f"{name}'s settings {inside!r} start without a name: write {name}(alpha=0.5)")
            settings[key] += "," + part  # a list (layers=20,21,22) or text with a comma, as typed
            continue
        key = setting.group(1).replace("-", "_")
        if key in settings:
            raise InvalidOptionError(f"{name}'s settings {inside!r} give {key} twice")
        settings[key] = setting.group(2).lstrip()
    return name, {k: v.strip() for k, v in settings.items()}


def canonical_spec(spec: str) -> str:
    """A text spec written one way (lower-case names, no spaces around names, keys and values, the
    stock model as ``none``): equal specs name one run, one folder."""
    parts = []
    for name, settings in parse_method_spec(spec):
        own = ",".join(f"{k}={v}" for k, v in settings.items()) if isinstance(settings, Mapping) else ""
        parts.append(f"{name}({own})" if own else name)
    return "+".join(parts) or "none"


def _name_of(method: MitigationMethod | Intervention) -> str:
    return str(getattr(method, "method", None) if isinstance(method, Intervention) else method.name)


def build_methods(spec: Any = None, *, strict: bool = True, **settings: Any) -> list[MitigationMethod]:
    """The methods of ``spec`` (see the module docstring), checked to combine. Each keyword setting goes
    to every named method that takes it; one that none takes raises :class:`InvalidOptionError` (with
    ``strict=False`` it is left out: a comparison of methods gives every method the same settings)."""
    pairs = parse_method_spec(spec)
    refuse_shared_settings(pairs, settings)
    taken: set[str] = set()
    methods: list[MitigationMethod] = []
    for name, item in pairs:
        if not isinstance(item, Mapping):
            methods.append(InterventionMethod(item) if isinstance(item, Intervention) else item)
            continue
        entry = METHODS[name]
        accepted = entry.settings()
        unknown = sorted(set(item) - set(accepted))
        if unknown:
            raise InvalidOptionError(f"{name} takes {', '.join(accepted)}; not {', '.join(unknown)}")
        own = {k: v for k, v in settings.items() if k in accepted}
        taken |= set(own)
        try:
            methods.append(entry.build(**{**own, **item}))
        except InvalidOptionError:
            raise
        except (TypeError, ValueError) as err:  # a setting the class refuses (tau="high", a positional mix-up)
            raise InvalidOptionError(f"{name}: a setting of the wrong type or value ({err})") from None
    overridden = sorted(
        key
        for key in settings
        if (takers := [item for name, item in pairs if isinstance(item, Mapping) and key in METHODS[name].settings()])
        and all(key in item for item in takers)
    )
    if overridden and strict:
        raise InvalidOptionError(
            f"{', '.join(overridden)} given once for all and again in the parentheses of every method that takes "
            f"it ({composition_name(methods)}): the shared value would go nowhere; give it once"
        )
    unused = sorted(set(settings) - taken)
    if unused and strict:
        named = [n for n, item in pairs if isinstance(item, Mapping)]
        built = [item for _, item in pairs if not isinstance(item, Mapping)]
        takes = "; ".join(f"{n} takes {', '.join(method_settings(n)) or 'nothing'}" for n in named)
        owners = {key: [item for item in built if key in _object_settings(item)] for key in unused}
        for_objects = [key for key in unused if owners[key]]
        if for_objects:  # a method object was built with its settings: a keyword cannot reach it
            first = owners[for_objects[0]][0]
            others = [key for key in unused if not owners[key]]
            raise InvalidOptionError(
                f"setting(s) {', '.join(for_objects)} cannot be applied to an already-built method object "
                f"({', '.join(_name_of(item) for item in built)}): give them to its constructor, e.g. "
                f"{type(first).__name__}({for_objects[0]}=...)"
                + (f"; and {', '.join(others)} are taken by no method of {composition_name(methods)}" if others else "")
                + (f" ({takes})" if takes and others else "")
            )
        raise InvalidOptionError(
            f"setting(s) {', '.join(unused)} are taken by no method of {composition_name(methods) or 'none'}"
            + (f" ({takes})" if takes else "" if built else " (method none takes no settings)")
        )
    check_composition(methods)
    return methods


def _object_settings(method: Any) -> set[str]:
    """The keyword settings a method object's class takes (a registered method's, CFG included)."""
    entry = METHODS.get(_name_of(method))
    own = set(_keywords(type(method)))
    return own | set(entry.settings()) if entry is not None else own


#: Settings that mean one thing in every method that takes them (how a contrast branch runs; the
#: official code's or the paper's behaviour), whatever their defaults.
SAME_MEANING = frozenset({"batched", "behaviour"})


@functools.cache
def _described_defaults(name: str) -> str:
    return json.dumps(build_methods(name, strict=False)[0].describe(), default=str)


def setting_default(name: str, key: str) -> Any:
    """What the registered method ``name`` runs with when ``key`` is not given (as it describes itself)."""
    return json.loads(_described_defaults(name)).get(key)


def setting_clashes(pairs: Sequence[tuple[str, Any]], keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The ``keys`` that several registered methods of ``pairs`` (:func:`parse_method_spec`'s) would take with
    different defaults, i.e. read differently (``alpha``: PAI's attention boost, 0.2, VCD's contrast, 1): key ->
    method -> default. A method with its own value for a key, in its dict or parentheses, does not read it."""
    registered = [(name, item) for name, item in pairs if isinstance(item, Mapping)]
    clashes = {}
    for key in keys:
        readers = list(dict.fromkeys(n for n, item in registered if key in method_settings(n) and key not in item))
        if key in SAME_MEANING or len(readers) < 2:
            continue
        defaults = {name: setting_default(name, key) for name in readers}
        if len({json.dumps(v, default=str) for v in defaults.values()}) > 1:
            clashes[key] = defaults
    return clashes


def refuse_shared_settings(pairs: Sequence[tuple[str, Any]], settings: Mapping[str, Any]) -> None:
    """A keyword setting that would go to two methods of a composition that read it differently is
    refused (a method with its own value for it, in its dict or parentheses, does not take the shared one)."""
    clashes = setting_clashes(pairs, settings)
    if not clashes:
        return
    said = "; ".join(
        f"{key} is read by {', '.join(f'{name} (default {value})' for name, value in defaults.items())}"
        for key, defaults in clashes.items()
    )
    parts = []
    for name, item in pairs:
        if not isinstance(item, Mapping):
            continue
        own = [f"{key}={settings[key]}" for key, defaults in clashes.items() if name in defaults]
        parts.append(f"{name}({','.join(own)})" if own else name)
    example = "+".join(parts)
    raise InvalidOptionError(
        f"one value would go to methods that read it differently: {said}. Give each method its own in its "
        f"parentheses, e.g. --method '{example}' (leave a method's out to keep its default; in Python, "
        "method={name: {setting: value}})"
    )


def check_on_model(methods: Sequence[MitigationMethod], model: Any) -> None:
    """Raise what each of ``methods`` would raise on ``model`` from its settings alone
    (:meth:`~.method.MitigationMethod.check_model`), before any of them answers."""
    for method in methods:
        method.check_model(model)


def decoding_refusal(methods: Sequence[MitigationMethod], num_beams: int) -> str | None:
    """Why ``methods`` cannot decode with ``num_beams`` (None: they can): a contrast branch (VCD, AGLA, PAI's
    or PAINT's guidance) keeps one cache per sequence, which beam search reorders."""
    if num_beams <= 1:
        return None
    branched = [m.name for m in methods if CONTRAST in kinds_of(m) or getattr(m, "guided", False)]
    if not branched:
        return None
    return (
        f"{', '.join(branched)} run(s) a contrast branch with one cache per sequence, which beam search reorders: "
        f"num_beams={num_beams} does not apply (use num_beams=1: greedy or sampled decoding)"
    )


def kinds_of(method: MitigationMethod) -> set[str]:
    """What a method does around ``generate``: edits attention, contrasts logits, rewrites the prompts
    (a registered method's kind; for others, what they override)."""
    entry = METHODS.get(method.name)
    if entry is not None:
        return {entry.kind}
    kinds = set()
    if any(isinstance(i, AttentionEdit) for i in method.interventions()):
        kinds.add(ATTENTION)
    if type(method).prepare is not MitigationMethod.prepare:
        kinds.add(PREPARE)
    overrides = (type(method).logits_processors, type(method).paired_contrast)
    if overrides != (MitigationMethod.logits_processors, MitigationMethod.paired_contrast):
        kinds.add(CONTRAST)
    return kinds


def check_composition(methods: Sequence[MitigationMethod]) -> None:
    """Raise :class:`~.base.InterventionConflictError` for a combination that cannot run (module docstring)."""
    names = [m.name for m in methods]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InterventionConflictError(f"method {', '.join(twice)} is listed twice")
    by_kind: dict[str, list[str]] = {}
    for method in methods:
        for kind in kinds_of(method):
            by_kind.setdefault(kind, []).append(method.name)
    edits, contrasts, rewrites = (by_kind.get(k, []) for k in (ATTENTION, CONTRAST, PREPARE))
    if len(edits) > 1:
        raise InterventionConflictError(
            f"{' and '.join(edits)} both edit the language model's attention; use one of var, pai, paint "
            "(an attention edit combines with a contrast method such as vcd or agla)"
        )
    if len(contrasts) > 1:
        raise InterventionConflictError(
            f"{' and '.join(contrasts)} each contrast the model's logits with their own branch and take the "
            "scores they are given as the original image's logits; use one of them"
        )
    if len(rewrites) > 1:
        raise InterventionConflictError(f"{' and '.join(rewrites)} both rewrite the prompts; use one of them")
    if rewrites and edits:
        raise InterventionConflictError(
            f"{rewrites[0]}'s probes read the stock model's attention to choose what to crop, which "
            f"{edits[0]} would change: combine {rewrites[0]} with no method or with a contrast method (vcd; agla "
            "with carve's paper behaviour)"
        )
    carve = next((m for m in methods if m.name == "carve"), None)
    if carve is not None and "agla" in names and getattr(carve, "behaviour", None) == "official":
        raise InterventionConflictError(
            "carve's official final pass asks about [original, refined] (two images per prompt) and agla "
            "augments one image per prompt: combine agla with carve's paper behaviour (behaviour='paper')"
        )


def composition_name(methods: Sequence[MitigationMethod]) -> str:
    """``"none"``, ``"var"``, ``"var+agla"``."""
    return "+".join(m.name for m in methods) or "none"


def ordered(methods: Sequence[MitigationMethod]) -> list[MitigationMethod]:
    """The order the pipeline runs them in: prompt rewrites, then contrast methods, then the rest, so a
    contrast method's processor comes before PAI's CFG processor in the chain."""
    rank = {PREPARE: 0, CONTRAST: 1}
    return sorted(methods, key=lambda m: min((rank.get(k, 2) for k in kinds_of(m)), default=2))
