"""Tasks: one :class:`TaskSpec` per task, and :func:`pipeline`.

A spec names everything a task is made of: its pipeline class(es) (a task may serve several
kinds of model; the model picks its pipeline), its evaluator, its training recipe, its default
models and the command-line options it adds. ``attnzoo run|eval|train <task>`` and ``attnzoo
tasks`` are generated from the specs, so a new task is one spec plus its own files:

>>> from attnzoo.tasks import Option, TaskSpec, register_task
>>> register_task(TaskSpec("my-task", "what it does", pipelines=("my_pkg.pipe:MyPipeline",),
...                        default_model="my_model", options=(Option("threshold", float, "..."),)))  # doctest: +SKIP

Specs refer to code as ``"module:attr"`` strings, so listing tasks imports no model code.
Packages can also add tasks through the ``attnzoo.tasks`` entry-point group (each entry point a
:class:`TaskSpec` or a function returning specs).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attnzoo.errors import InvalidInputError, InvalidOptionError, UnknownNameError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from attnzoo.pipelines.base import Pipeline

_logger = logging.getLogger(__name__)

COMMANDS = ("run", "eval", "train")


@dataclass(frozen=True)
class Option:
    """A command-line option a task adds, e.g. ``Option("caption", str, "what the viewer looks for")``.

    ``attnzoo run`` passes it to the pipeline (constructor keyword), ``attnzoo eval`` to the
    evaluator's :meth:`~attnzoo.evaluation.runner.TaskEvaluator.plan`, ``attnzoo train`` to the recipe
    as an override; ``commands`` says which of them take it. ``None`` (the default) means "not given".
    """

    name: str
    type: type = str
    help: str = ""
    commands: tuple[str, ...] = ("run",)
    default: Any = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _load(ref: Any) -> Any:
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass
class TaskSpec:
    """Everything that makes a task; code is referenced as ``"module:attr"`` (or given as objects)."""

    name: str
    description: str
    pipelines: tuple[Any, ...]
    """Pipeline classes; the first whose ``accepts(model)`` is true serves a model."""
    default_model: str | None = None
    aliases: tuple[str, ...] = ()
    evaluator: Any = None
    """A :class:`~attnzoo.evaluation.runner.TaskEvaluator` subclass: ``attnzoo eval <task>``."""
    recipe: Any = None
    """``f(model, data, out, *, config, overrides, weights, resume, device) -> dict``: ``attnzoo train <task>``."""
    train_model: str | None = None
    """The model trained by default, when it is not the pipeline's default."""
    inputs: str = "images"
    """What ``attnzoo run`` takes: ``"images"`` (files; folders expand to their images), ``"folders"``
    (each folder is one input: the views of one object) or ``"files"`` (files and folders as given)."""
    inputs_help: str | None = None
    """``attnzoo run``'s help for its inputs (None: the usual one for ``inputs``)."""
    eval_split: str = "test"
    options: tuple[Option, ...] = ()
    data_help: str = "Dataset root folder."
    docs: str | None = None
    """The docs page (under docs/) that explains the task."""
    _loaded: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def pipeline_classes(self) -> list[type[Pipeline]]:
        if "pipelines" not in self._loaded:
            self._loaded["pipelines"] = [_load(p) for p in self.pipelines]
        return self._loaded["pipelines"]

    def pipeline_for(self, model: Any) -> type[Pipeline]:
        serves = model_tasks(model)
        for cls in self.pipeline_classes():
            if self._runs_in(cls, serves) and cls.accepts(model):
                return cls
        if serves is not None and self.name not in serves:
            raise _wrong_task(self, f"a {type(model).__name__}", serves)
        kinds = ", ".join(c.__name__ for c in self.pipeline_classes())
        raise InvalidInputError(
            f"the {self.name} task has no pipeline for a {type(model).__name__} (its pipelines: {kinds})"
        )

    def _takes(self, serves: tuple[str, ...] | None) -> bool:
        """Whether a model that attnzoo knows to serve ``serves`` (None: a model it does not know) may run in
        one of this task's pipelines."""
        return any(self._runs_in(cls, serves) for cls in self.pipeline_classes())

    def _runs_in(self, cls: type[Pipeline], serves: tuple[str, ...] | None) -> bool:
        """A model of unknown kind may run in any pipeline (its ``accepts`` decides); one of ours in this task
        or a pipeline made for a task its registry entry lists; a timm classifier also in a pipeline that
        claims models itself, with its own ``accepts`` (e.g. a third party's task on timm backbones)."""
        if serves is None or self.name in serves or cls.task in serves:
            return True
        from attnzoo.pipelines.base import Pipeline

        own_accepts = getattr(cls.accepts, "__func__", None) is not getattr(Pipeline.accepts, "__func__", None)
        return serves == _CLASSIFIER and own_accepts

    def load_evaluator(self) -> Any:
        if self.evaluator is None:
            raise InvalidInputError(f"the {self.name} task has no evaluation yet")
        return _load(self.evaluator)

    def load_recipe(self) -> Any:
        if self.recipe is None:
            raise InvalidInputError(f"the {self.name} task has no training recipe (nothing to train)")
        return _load(self.recipe)

    def options_for(self, command: str) -> tuple[Option, ...]:
        return tuple(o for o in self.options if command in o.commands)

    def models(self) -> list[str]:
        """attnzoo's registered models that serve this task."""
        from attnzoo.factory import attnzoo_models

        return [name for name, tasks in attnzoo_models().items() if self.name in tasks]


_CLASSIFIER = ("image-classification",)


def model_tasks(model: Any) -> tuple[str, ...] | None:
    """The tasks attnzoo knows ``model`` (a name or a model object) to serve: its registry entry's for our own
    models (an object by the module its class comes from), image classification for timm's classifiers
    (ours registered with timm included); None for a model it does not know (a third party's)."""
    import timm.models

    from attnzoo.factory import load_families
    from attnzoo.registry import get_model_entry, registered_models

    load_families()
    if isinstance(model, str):
        entry = get_model_entry(model)
        if entry is not None:
            return entry.tasks
        return _CLASSIFIER if timm.models.is_model(model) else None
    module = type(model).__module__
    served = {
        task
        for entry in map(get_model_entry, registered_models())
        if entry is not None and getattr(entry.fn, "__module__", None) == module
        for task in entry.tasks
    }
    if served:
        return tuple(sorted(served))
    timm_modules = {timm.models.model_entrypoint(n).__module__ for n in timm.models.list_models()}
    return _CLASSIFIER if module.startswith("timm.") or module in timm_modules else None


def _wrong_task(spec: TaskSpec, what: str, serves: tuple[str, ...]) -> InvalidOptionError:
    default = f" (its default model: {spec.default_model})" if spec.default_model else ""
    return InvalidOptionError(
        f"the {spec.name} task does not take {what}: it is a model for {', '.join(serves)}{default}"
    )


_TASKS: dict[str, TaskSpec] = {}
_ALIASES: dict[str, str] = {}
_entry_points_loaded = False


def register_task(spec: TaskSpec, *, overwrite: bool = False) -> TaskSpec:
    """Add a task (third parties may too). Its name and aliases must be new unless ``overwrite``."""
    taken = {spec.name, *spec.aliases} & (set(_TASKS) | set(_ALIASES))
    if taken and not overwrite:
        raise ValueError(f"task name(s) {sorted(taken)} already registered")
    unregister_task(spec.name)
    _TASKS[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def unregister_task(name: str) -> None:
    spec = _TASKS.pop(name, None)
    for alias in spec.aliases if spec else ():
        _ALIASES.pop(alias, None)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="attnzoo.tasks"):
        try:
            found = ep.load()
            specs = found() if callable(found) and not isinstance(found, TaskSpec) else found
            for spec in [specs] if isinstance(specs, TaskSpec) else specs:
                register_task(spec, overwrite=True)
        except Exception as err:  # a broken plug-in must not break attnzoo
            _logger.warning("could not load task entry point %s: %s", ep.name, err)


def get_task(task: str) -> TaskSpec:
    _load_entry_points()
    if not isinstance(task, str):
        raise InvalidInputError(f"a task is named by a string, got {task!r}; the tasks: {', '.join(sorted(_TASKS))}")
    name = _ALIASES.get(task, task)
    if name not in _TASKS:
        raise UnknownNameError("task", task, list(_TASKS) + list(_ALIASES), choices=sorted(_TASKS))
    return _TASKS[name]


def list_tasks() -> list[str]:
    _load_entry_points()
    return sorted(_TASKS)


def all_tasks() -> list[TaskSpec]:
    return [_TASKS[name] for name in list_tasks()]


def pipeline(
    task: str,
    model: str | torch.nn.Module | Any | None = None,
    *,
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    pretrained: bool | None = None,
    device: str | int | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Pipeline:
    """Build the pipeline for ``task``.

    ``model`` is a registered name (pretrained weights by default, as in transformers; a ``Path`` is read as
    the same string), or a model object used as is. ``weights`` overrides the checkpoint (a path, URL,
    registered name, or ``"none"`` for random initialisation). With a model object, ``weights=`` a checkpoint
    is loaded into it, and ``weights="none"`` leaves its weights untouched and only records them as random
    (for a model you built untrained: its results and pictures then say "random weights"); ``pretrained=``
    applies to a name only and is refused with an object. ``dtype`` is a floating dtype or its name, or
    ``"auto"`` (as None: the model's own); ``torch_dtype=``, transformers' older name for it, is taken as
    ``dtype``. Remaining keywords go to the pipeline (its settings and the defaults of its call keywords).
    """
    dtype = _dtype_or_alias(dtype, kwargs)
    spec = get_task(task)
    if model is None:
        model = spec.default_model
    if model is None:
        raise InvalidInputError(f"the {spec.name} task has no default model: pass model=")
    if isinstance(model, os.PathLike):  # a name given as a Path reads as the same string (a file: told so)
        model = os.fsdecode(model)
    if not isinstance(model, str):
        from attnzoo.pipelines.base import check_model_object

        check_model_object(model)
        if pretrained is not None:
            raise InvalidOptionError(
                f"pretrained={pretrained!r} applies to a model given by name; a model object is used as given, its "
                "weights untouched: load a checkpoint into it with weights=PATH, or say that it has random weights "
                "with weights='none'"
            )
    from attnzoo._placement import resolve_device, resolve_dtype

    if device is not None:  # a device or dtype that cannot work is refused before any weights are fetched
        resolve_device(device)
    resolve_dtype(dtype)
    built: Any = model
    pretrained = weights is None if pretrained is None else pretrained
    random = (weights is None and not pretrained) or (isinstance(weights, str) and weights.strip().lower() == "none")
    if isinstance(model, str):
        import torch

        from attnzoo.factory import create_model

        serves = model_tasks(model)
        if not spec._takes(serves):  # before building: no weights are fetched for a model the task cannot run
            raise _wrong_task(spec, repr(model), serves)  # type: ignore[arg-type]
        for cls in spec.pipeline_classes():  # settings no model could take: refused before any weights load
            if spec._runs_in(cls, serves):
                cls.check_settings(kwargs)
        # random weights are drawn from a fixed seed: every process of a sharded or resumed run, and
        # every rerun, gets the same model
        with torch.random.fork_rng(devices=[]):
            if random:
                torch.manual_seed(RANDOM_INIT_SEED)
            built = create_model(model, pretrained=pretrained, weights=weights, **dict(model_kwargs or {}))
        cls = spec.pipeline_for(built)
        built = cls.configure_model(built, weights)
    else:
        if weights is not None and not random:
            from attnzoo.weights import load_weights

            load_weights(model, weights)
        cls = spec.pipeline_for(model)
    pipe = cls(built, device=device, dtype=dtype, **kwargs)
    pipe.weights_label = describe_weights(built, weights, random, from_name=isinstance(model, str))
    return pipe


def _dtype_or_alias(dtype: Any, kwargs: dict[str, Any]) -> Any:
    """``dtype``, or the ``torch_dtype`` among ``kwargs`` (transformers' older name, taken out of them) where
    only that is given; both given for different dtypes is refused."""
    if "torch_dtype" not in kwargs:
        return dtype
    alias = kwargs.pop("torch_dtype")
    if alias is None:
        return dtype
    if dtype is None:
        return alias
    from attnzoo._placement import resolve_dtype

    if resolve_dtype(dtype) != resolve_dtype(alias):
        raise InvalidOptionError(
            f"dtype={dtype!r} and torch_dtype={alias!r} (its older name) ask for different dtypes: pass dtype= only"
        )
    return dtype


#: The seed random initialisation draws from when a pipeline is built by name with ``weights="none"``.
RANDOM_INIT_SEED = 0


def describe_weights(model: Any, weights: Any, random: bool, *, from_name: bool = True) -> str | None:
    """What a run's records and pictures say about the weights: ``"random (seed 0)"``, ``"pretrained
    (<checkpoint>)"``, the file or name given, or None for a model object given as is."""
    if random:
        return f"random (seed {RANDOM_INIT_SEED})" if from_name else "random"
    if weights is not None:
        return os.fspath(weights) if isinstance(weights, (str, os.PathLike)) else "a state dict"
    if not from_name:
        return None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    name = cfg.get("checkpoint") or (f"{arch}.{tag}" if arch and tag else None)
    return f"pretrained ({name})" if name else "pretrained"


def get_evaluator(task: str) -> Any:
    """The evaluator class of a task (aliases resolved)."""
    return get_task(task).load_evaluator()


# the built-in tasks, one spec each
from attnzoo.tasks import (  # noqa: E402,F401
    hallucination_mitigation,
    image_classification,
    multiview_reconstruction,
    scanpath,
    subject_insertion,
    wsi_classification,
)

__all__ = [
    "COMMANDS",
    "Option",
    "TaskSpec",
    "all_tasks",
    "get_evaluator",
    "get_task",
    "list_tasks",
    "model_tasks",
    "pipeline",
    "register_task",
    "unregister_task",
]
