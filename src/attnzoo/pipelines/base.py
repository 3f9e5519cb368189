"""The pipeline contract, after transformers: ``preprocess -> _forward -> postprocess``.

``preprocess`` runs per input (in DataLoader workers when ``num_workers > 0``), ``_forward``
runs per batch and is the only stage that touches the device, ``postprocess`` turns one
sample's outputs into plain Python. ``_sanitize_parameters`` routes call keywords to the
three stages.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

# resolve_device / resolve_dtype live in the leaf attnzoo._placement (create_model and NevaClip use them too);
# they stay importable from here
from attnzoo._placement import parameter_dtype, resolve_device, resolve_dtype
from attnzoo._values import check_worker_count, whole_number

# generator_seed lives in the leaf attnzoo._values (datasets check split seeds with it too); the pipelines, the
# evaluation runners and callers import it from here
from attnzoo._values import generator_seed as generator_seed
from attnzoo.datasets.images import FileContents, file_contents, is_file_object
from attnzoo.errors import DatasetFormatError, InvalidInputError, InvalidOptionError

#: What a bad input raises while it is read: set aside with ``on_error="skip"`` (a file that does not read as
#: what it claims to be, e.g. a corrupt feature file or slide, is a :class:`DatasetFormatError`).
INPUT_ERRORS: tuple[type[InvalidInputError] | type[DatasetFormatError], ...] = (InvalidInputError, DatasetFormatError)


def is_single_input(inputs: Any) -> bool:
    """One image (path, binary file object, PIL, HxW[xC] array, CxHxW tensor) versus a batch of them."""
    if isinstance(inputs, (str, bytes, os.PathLike, Image.Image, dict)) or is_file_object(inputs):
        return True
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        return inputs.ndim < 4
    return not isinstance(inputs, Iterable)


class _Preprocessed(torch.utils.data.Dataset):
    """Runs ``fn`` on each input and hands failures on as values, so one bad file can't stop a batch."""

    def __init__(self, inputs: Sequence[Any], fn: Callable[[Any], dict], offset: int = 0):
        self.inputs, self.fn, self.offset = inputs, fn, offset

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[int, dict | None, Exception | None]:
        try:
            return self.offset + i, self.fn(self.inputs[i]), None
        except INPUT_ERRORS as err:  # handed back as a value, so a DataLoader worker does not wrap it either
            return self.offset + i, None, err


class Pipeline:
    """Base class: subclasses write ``preprocess``, ``_forward`` and ``postprocess`` (and, when they take
    call keywords, ``_sanitize_parameters`` with those keywords as named arguments).

    The base owns device and dtype placement, the inference context, batching, single-vs-list
    inputs and the check of unknown keywords, so a task's pipeline holds only its own logic.
    """

    task: ClassVar[str] = ""
    #: Call keywords that carry data of each input (e.g. a caption per image): one value for all
    #: inputs, or a list with one per input; they reach ``preprocess`` inside a dict item.
    input_fields: ClassVar[tuple[str, ...]] = ()
    #: How deeply one input's value of a field nests (OAT's ``boxes``, an [N, 4] list: 2), so that one such
    #: list is read as the value for every input, not as one value per input; fields not named: 0.
    field_depths: ClassVar[dict[str, int]] = {}
    #: The key under which a plain (non-dict) input goes into that dict item.
    primary_field: ClassVar[str] = "image"
    #: ``_forward`` runs under ``torch.inference_mode()`` unless the model needs gradients (NevaClip).
    needs_grad: ClassVar[bool] = False
    #: The sample key that marks an input to prepare in the calling process, not in a DataLoader worker (one
    #: that needs a model of the pipeline's: a worker would load its own copy and cannot use CUDA). For such an
    #: input :meth:`preprocessor` gives a sample holding, under this key, what :meth:`prepare_here` takes (and
    #: every other key of a sample, as None, so that a batch collates); for any other input, None under it.
    #: The batches must then be dicts of per-sample sequences (:func:`list_collate`). None: no such inputs.
    prepared_here_key: ClassVar[str | None] = None
    #: Binary file objects in a list of inputs (and in the call keywords that go with each input, as
    #: ``subject=open(...)``) are read here, each once, to a picklable :class:`~attnzoo.datasets.images.FileContents`
    #: that DataLoader workers decode: forked workers would share an open file's one position, and a spawned one
    #: cannot be sent an open file. False: kept unread, as their type and name (a task that refuses them by name).
    reads_file_objects: ClassVar[bool] = True

    def __init__(
        self,
        model: Any,
        *,
        device: str | int | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        **kwargs: Any,
    ):
        check_model_object(model)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.batch_size = _positive_int("batch_size", batch_size)
        #: What the weights are ("random (seed 0)", "pretrained (...)", a path); set by attnzoo.pipeline,
        #: recorded by ``attnzoo run`` and shown on pictures. None: a model object given as is.
        self.weights_label: str | None = None
        self.num_workers = check_worker_count(_non_negative_int("num_workers", num_workers))
        self._defaults = self._checked_parameters(kwargs)

    @classmethod
    def accepts(cls, model: Any) -> bool:
        """Whether this pipeline serves ``model`` (a task with several model kinds picks by this)."""
        return True

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> None:
        """Refuse the values among ``settings`` that no model could take, before :func:`attnzoo.pipeline`
        builds a model by name (its weights can be gigabytes). Checks only the names it knows: the
        constructor still refuses unknown ones. Default: nothing to check without the model."""

    @classmethod
    def configure_model(cls, model: Any, weights: Any) -> Any:
        """Called by :func:`attnzoo.pipeline` after building a model by name, with the weights it was
        given; a pipeline may read what a training run wrote beside them."""
        return model

    def __repr__(self) -> str:
        cfg = getattr(self.model, "pretrained_cfg", {}) or {}
        model = cfg.get("architecture") or type(self.model).__name__
        weights = f", weights={self.weights_label!r}" if self.weights_label else ""
        device = str(self.device)
        return f"{type(self).__name__}(task={self.task!r}, model={model!r}{weights}, device={device!r}, dtype={self.dtype})"

    # -- the stages -------------------------------------------------------------------
    # (``*args: Any, **kwargs: Any`` so that subclasses name exactly the parameters they take)
    def _sanitize_parameters(self, *args: Any, **kwargs: Any) -> tuple[dict, dict, dict]:
        """Split call keywords into (preprocess, forward, postprocess) parameters. Subclasses name the
        keywords they take as arguments; the base refuses any other."""
        return {}, {}, {}

    def preprocess(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """One input -> a dict of tensors and values (runs in DataLoader workers when ``num_workers > 0``)."""
        raise NotImplementedError

    def _forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """A collated batch, on the device, -> the model's outputs."""
        raise NotImplementedError

    def postprocess(self, *args: Any, **kwargs: Any) -> Any:
        """One sample's outputs -> the result object."""
        raise NotImplementedError

    def preprocessor(self, *args: Any, **params: Any) -> Callable[[Any], dict[str, Any]]:
        """A picklable per-input callable for DataLoader workers (override to avoid shipping the model)."""
        return functools.partial(self.preprocess, **params)

    def prepare_here(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``(marked, num_workers, **params)``: one input marked under :attr:`prepared_here_key` (``marked``: the
        value there) as its sample, in the calling process, with this call's preprocess parameters;
        ``num_workers``: the call's DataLoader workers (idle meanwhile). One of :data:`INPUT_ERRORS` sets the input
        aside, as one raised in a worker does."""
        raise NotImplementedError

    #: Stacks preprocessed samples into a batch; a plain function so DataLoader workers can run it.
    #: Pipelines whose samples do not stack use :func:`list_collate`.
    collate = staticmethod(torch.utils.data.default_collate)

    def forward(self, batch: dict[str, Any], **params: Any) -> dict[str, Any]:
        """Device placement and the inference context around ``_forward``; outputs come back on the CPU."""
        dtype = self.dtype if self.dtype is not None else parameter_dtype(self.model)
        moved = _map_tensors(batch, functools.partial(self._to_device, dtype=dtype))
        context = torch.enable_grad() if self.needs_grad else torch.inference_mode()
        with context:
            outputs = self._forward(moved, **params)
        return _map_tensors(outputs, lambda t: t.detach().cpu())

    def _to_device(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Floating inputs in ``dtype`` (the pipeline's, else the model's own, as transformers does), so a
        model already in half precision takes float32 pictures; integer inputs as they are."""
        cast = dtype if dtype is not None and tensor.is_floating_point() else None
        return tensor.to(self.device, dtype=cast, non_blocking=True)

    # -- running ----------------------------------------------------------------------
    def is_single(self, inputs: Any) -> bool:
        """One input versus a batch of them (override where one input is itself a list, e.g. views)."""
        return is_single_input(inputs)

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        """One input gives one result; a list/iterable (or a 4-D array) gives a list."""
        single = self.is_single(inputs)
        items: Any = [inputs] if single else inputs
        if isinstance(items, (np.ndarray, torch.Tensor)):
            items = list(items)
        results = [result for _, result in self.iterate(items, **kwargs)]
        return results[0] if single else results

    def _with_fields(self, items: list[Any], fields: dict[str, Any]) -> list[dict[str, Any]]:
        """Each input as a dict item holding its share of the per-input call keywords."""
        columns = {
            name: _broadcast(value, len(items), name, self.field_depths.get(name, 0)) for name, value in fields.items()
        }
        out = []
        for i, item in enumerate(items):
            row = dict(item) if isinstance(item, Mapping) else {self.primary_field: item}
            for name, column in columns.items():
                row.setdefault(name, column[i])
            out.append(row)
        return out

    def iterate(
        self,
        inputs: Iterable[Any],
        *,
        batch_size: int | None = None,
        num_workers: int | None = None,
        on_error: str = "raise",
        **kwargs: Any,
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, result)`` in input order; with ``on_error="skip"`` a bad input yields its error."""
        if on_error not in ("raise", "skip"):
            raise InvalidInputError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        fields = {name: kwargs.pop(name) for name in self.input_fields if name in kwargs}
        fields = {name: value for name, value in fields.items() if value is not None}
        if fields:
            inputs = self._with_fields(list(inputs), fields)
        if isinstance(inputs, (list, tuple)):  # (a generator is read here, item by item; a dataset's items are its own)
            inputs = _read_file_objects(inputs, self.reads_file_objects)
        batch_size = _positive_int("batch_size", self.batch_size if batch_size is None else batch_size)
        num_workers = check_worker_count(
            _non_negative_int("num_workers", self.num_workers if num_workers is None else num_workers)
        )
        pre, fwd, post = self._merged_parameters(kwargs)
        fn = self.preprocessor(**pre)
        for batch in self._batches(inputs, fn, batch_size, num_workers):
            indices, collated, errors = self._prepared_here(batch, num_workers, pre)
            if errors and on_error == "raise":
                raise errors[0][1]
            results: dict[int, Any] = dict(errors)
            if indices:
                outputs = self.forward(collated, **fwd)
                for j, index in enumerate(indices):
                    results[index] = self.postprocess(_take(outputs, j), **post)
            yield from sorted(results.items())

    def _prepared_here(self, batch: tuple, num_workers: int, params: dict[str, Any]) -> tuple:
        """``batch`` with each input marked under :attr:`prepared_here_key` prepared by :meth:`prepare_here`;
        one that cannot be joins the batch's errors, in input order."""
        key = self.prepared_here_key
        if key is None:
            return batch
        indices, collated, errors = batch
        kept: list[int] = []
        samples: list[dict[str, Any]] = []
        errors = list(errors)
        for j, index in enumerate(indices):
            sample = {name: values[j] for name, values in collated.items()}
            marked = sample.pop(key)
            if marked is not None:
                try:
                    sample = self.prepare_here(marked, num_workers, **params)
                except INPUT_ERRORS as err:
                    errors.append((index, err))
                    continue
            kept.append(index)
            samples.append(sample)
        errors.sort(key=lambda error: error[0])
        return kept, (self.collate(samples) if samples else None), errors

    def _checked_parameters(self, kwargs: dict[str, Any]) -> tuple[dict, dict, dict]:
        accepted = _named_parameters(self._sanitize_parameters)
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            takes = f"it takes {', '.join(sorted(accepted))}" if accepted else "it takes no keywords"
            raise InvalidInputError(f"{type(self).__name__} got unexpected arguments {unknown}; {takes}")
        return self._sanitize_parameters(**kwargs)

    def _merged_parameters(self, kwargs: dict[str, Any]) -> tuple[dict, dict, dict]:
        call = self._checked_parameters(kwargs)
        return tuple({**default, **given} for default, given in zip(self._defaults, call))  # type: ignore[return-value]

    def _batches(self, inputs: Iterable[Any], fn: Callable, batch_size: int, num_workers: int) -> Iterator[tuple]:
        split = functools.partial(_split_collate, collate=self.collate)
        if isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
            dataset = _Preprocessed(inputs, fn)
            if num_workers > 0:
                yield from torch.utils.data.DataLoader(
                    dataset,
                    batch_size=batch_size,
                    num_workers=num_workers,
                    collate_fn=split,
                    pin_memory=self.device.type == "cuda",
                )
                return
            for start in range(0, len(dataset), batch_size):
                yield split([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            return
        iterator, offset = iter(inputs), 0
        while chunk := list(islice(iterator, batch_size)):
            dataset = _Preprocessed(chunk, fn, offset)
            yield split([dataset[i] for i in range(len(chunk))])
            offset += len(chunk)


def _read_file_objects(inputs: list[Any] | tuple[Any, ...], read: bool = True) -> list[Any] | tuple[Any, ...]:
    """``inputs`` with each binary file object in them (an input, an input's views, a value of a dict item) as its
    :class:`~attnzoo.datasets.images.FileContents` (``read``: with its bytes), each file read once however often
    it is given; ``inputs`` itself when none is there."""
    seen: dict[int, tuple[Any, FileContents]] = {}  # by id, holding the file so that its id is not reused meanwhile

    def walk(value: Any, depth: int) -> Any:
        if is_file_object(value):
            if id(value) not in seen:
                seen[id(value)] = (value, file_contents(value, read=read))
            return seen[id(value)][1]
        if depth >= _FILE_OBJECT_DEPTH:
            return value
        if type(value) in (list, tuple):
            items = [walk(item, depth + 1) for item in value]
            return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
        if type(value) is dict:
            row = {key: walk(item, depth + 1) for key, item in value.items()}
            return value if all(row[key] is item for key, item in value.items()) else row
        return value

    return walk(inputs, 0)


#: How deep in the inputs file objects are looked for: the list, an input (a dict item, an object's views), a
#: field's value, a list in it (a field holding one file per view).
_FILE_OBJECT_DEPTH = 4


def check_model_object(model: Any) -> None:
    """``model`` as a model object a pipeline can place: a ``torch.nn.Module``, a wrapper with callable ``.to`` and
    ``.eval`` (attnzoo's LVLMCheckpoint, NevaClip, FluxFillModel) or a diffusers pipeline (subject insertion wraps
    it); else an :class:`InvalidOptionError` saying what ``model=`` takes (a state dict, a path, a number would
    fail on ``.to``, a tensor on ``.eval``)."""
    if _is_model_object(model):
        return
    takes = "model= takes a model name (see 'attnzoo models') or a model object (a torch.nn.Module)"
    if isinstance(model, type):
        raise InvalidOptionError(f"{takes}; got the class {model.__name__}: build the model first")
    if isinstance(model, torch.Tensor):
        raise InvalidOptionError(
            f"{takes}; got a tensor of shape {tuple(model.shape)}: a tensor holds weights or data, not a model "
            "(weights go in weights=, beside the model's name)"
        )
    if isinstance(model, Mapping):
        raise InvalidOptionError(
            f"{takes}; got a mapping ({type(model).__name__}): a state dict goes in weights=, beside the model's "
            "name (or load it into your model object first)"
        )
    shown = repr(model)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise InvalidOptionError(f"{takes}; got {type(model).__name__} {shown}")


def _is_model_object(model: Any) -> bool:
    if isinstance(model, type) or isinstance(model, torch.Tensor):  # a tensor has .to, and no .eval
        return False
    if isinstance(model, torch.nn.Module):
        return True
    if not callable(getattr(model, "to", None)):
        return False
    if callable(getattr(model, "eval", None)):
        return True
    diffusers = sys.modules.get("diffusers")  # imported wherever one of its pipelines was built
    return diffusers is not None and isinstance(model, getattr(diffusers, "DiffusionPipeline", ()))


def weights_note(label: str | None) -> str:
    """How a picture's title names the weights: "random weights" (predictions are meaningless), else nothing."""
    return "random weights" if label and label.startswith("random") else ""


def list_collate(samples: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """A batch as a dict of lists, for samples that do not stack (variable sizes, non-tensors)."""
    return {k: [s[k] for s in samples] for k in samples[0]}


def _named_parameters(fn: Callable[..., Any]) -> set[str]:
    """The keyword names ``fn`` declares (a ``**kwargs`` catch-all declares none)."""
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _broadcast(value: Any, n: int, name: str, depth: int = 0) -> list[Any]:
    """One value for every input, or a list (or a 2-D tensor's rows) with one per input; a list nested
    ``depth`` deep (a field's :attr:`Pipeline.field_depths`) is one value."""
    if depth and _is_one_value(value, depth):
        return [value] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InvalidInputError(f"got {len(value)} values of {name}= for {n} inputs: give one, or one per input")
        return list(value)
    if isinstance(value, torch.Tensor) and value.ndim == 2 and n > 1:
        if value.shape[0] != n:
            raise InvalidInputError(f"got {value.shape[0]} rows of {name}= for {n} inputs")
        return list(value)
    return [value] * n


def _is_one_value(value: Any, depth: int) -> bool:
    """Whether ``value`` is one input's value of a field nested ``depth`` deep: an array of that many
    dimensions, or a list whose every item nests one level less (a per-input list of displays' boxes has
    items of another depth: an empty display's ``[]``, a path)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.ndim == depth
    if isinstance(value, (list, tuple)):
        return all(not isinstance(item, str) and _nesting(item) == depth - 1 for item in value)
    return False


def _nesting(value: Any) -> int:
    """How deeply lists, tuples and arrays nest in ``value``, read along the first items (0: a scalar; -1: a
    mapping, which no array of numbers holds: subject insertion's per-input lists of VIA regions stay per input)."""
    if isinstance(value, Mapping):
        return -1
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.ndim
    if isinstance(value, (list, tuple)):
        return 1 + (_nesting(value[0]) if value else 0)
    return 0


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` on every tensor in a batch: dict values, and tensors inside lists and tuples."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def _split_collate(
    items: list[tuple[int, dict | None, Exception | None]], collate: Callable[[list], Any]
) -> tuple[list[int], Any, list[tuple[int, Exception]]]:
    """Set failed inputs aside and collate the rest (runs inside DataLoader workers)."""
    indices: list[int] = []
    samples: list[dict | None] = []
    errors: list[tuple[int, Exception]] = []
    for index, sample, err in items:
        if err is not None:
            errors.append((index, err))
        else:
            indices.append(index)
            samples.append(sample)
    return indices, (collate(samples) if samples else None), errors


def _take(outputs: dict[str, Any], j: int) -> dict[str, Any]:
    return {k: v[j] if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in outputs.items()}


def check_batching(batch_size: Any, num_workers: Any) -> tuple[int, int]:
    """``batch_size`` (>= 1) and ``num_workers`` (>= 0, below the system's process limit) as ints, or a typed
    error naming the bad one."""
    return _positive_int("batch_size", batch_size), check_worker_count(_non_negative_int("num_workers", num_workers))


def _positive_int(name: str, value: Any) -> int:
    return whole_number(value, name, error=InvalidInputError)


def _non_negative_int(name: str, value: Any) -> int:
    return whole_number(value, name, low=0, error=InvalidInputError)
