"""The pipeline contract, after transformers: ``preprocess -> _forward -> postprocess``.

``preprocess`` runs per input (in DataLoader workers when ``num_workers > 0``), ``_forward``
runs per batch and is the only stage that touches the device, ``postprocess`` turns one
sample's outputs into plain Python. ``_sanitize_parameters`` routes call keywords to the
three stages.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from attnzoo.errors import InvalidInputError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


def _this_process_cuda() -> torch.device:
    """``cuda``, or under a multi-process ``torchrun`` this process's own GPU (``cuda:LOCAL_RANK``):
    a bare ``cuda`` means whichever device is current, which changes once the process group is set up."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("LOCAL_RANK", "").isdigit():
        return torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
    return torch.device("cuda")


def resolve_device(device: str | int | torch.device | None) -> torch.device:
    """``None`` picks CUDA when present; ints mean CUDA ordinals, as in transformers."""
    if device is None:
        return _this_process_cuda() if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, int):
        device = "cpu" if device < 0 else f"cuda:{device}"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidInputError(f"device={device!r} is not a device torch knows ({err})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device={device!r} asked for CUDA, but no CUDA device is available here")
    return _this_process_cuda() if resolved.type == "cuda" and resolved.index is None else resolved


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise InvalidInputError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}") from None


def is_single_input(inputs: Any) -> bool:
    """One image (path, PIL, HxW[xC] array, CxHxW tensor) versus a batch of them."""
    if isinstance(inputs, (str, bytes, os.PathLike, Image.Image, dict)):
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

    def __getitem__(self, i: int) -> tuple[int, dict | None, InvalidInputError | None]:
        try:
            return self.offset + i, self.fn(self.inputs[i]), None
        except InvalidInputError as err:
            return self.offset + i, None, err


class Pipeline:
    """Base class: subclasses define ``preprocess``, ``_forward`` and ``postprocess``."""

    task: ClassVar[str] = ""
    default_model: ClassVar[str | None] = None

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: str | int | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        **kwargs: Any,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.batch_size = _positive_int("batch_size", batch_size)
        self.num_workers = num_workers
        self._defaults = self._sanitize_parameters(**kwargs)

    # -- the stages -------------------------------------------------------------------
    def _sanitize_parameters(self, **kwargs: Any) -> tuple[dict, dict, dict]:
        if kwargs:
            raise InvalidInputError(f"{type(self).__name__} got unexpected arguments: {sorted(kwargs)}")
        return {}, {}, {}

    def preprocess(self, inputs: Any, **params: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _forward(self, batch: dict[str, torch.Tensor], **params: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def postprocess(self, outputs: dict[str, torch.Tensor], **params: Any) -> Any:
        raise NotImplementedError

    def preprocessor(self, **params: Any) -> Callable[[Any], dict[str, torch.Tensor]]:
        """A picklable per-input callable for DataLoader workers (override to avoid shipping the model)."""
        return functools.partial(self.preprocess, **params)

    #: Stacks preprocessed samples into a batch; a plain function so DataLoader workers can run it.
    collate = staticmethod(torch.utils.data.default_collate)

    def forward(self, batch: dict[str, torch.Tensor], **params: Any) -> dict[str, torch.Tensor]:
        """Device placement and ``inference_mode`` around ``_forward``; outputs come back on the CPU."""
        moved = {
            k: v.to(self.device, dtype=self.dtype if self.dtype is not None and v.is_floating_point() else None, non_blocking=True)
            if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }
        with torch.inference_mode():
            outputs = self._forward(moved, **params)
        return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in outputs.items()}

    # -- running ----------------------------------------------------------------------
    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        """One input gives one result; a list/iterable (or a 4-D array) gives a list."""
        single = is_single_input(inputs)
        items: Iterable[Any] = [inputs] if single else inputs
        if isinstance(items, (np.ndarray, torch.Tensor)):
            items = list(items)
        results = [result for _, result in self.iterate(items, **kwargs)]
        return results[0] if single else results

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
        batch_size = _positive_int("batch_size", batch_size or self.batch_size)
        num_workers = self.num_workers if num_workers is None else num_workers
        pre, fwd, post = self._merged_parameters(kwargs)
        fn = self.preprocessor(**pre)
        for batch in self._batches(inputs, fn, batch_size, num_workers):
            indices, collated, errors = batch
            if errors and on_error == "raise":
                raise errors[0][1]
            results: dict[int, Any] = dict(errors)
            if indices:
                outputs = self.forward(collated, **fwd)
                for j, index in enumerate(indices):
                    results[index] = self.postprocess(_take(outputs, j), **post)
            yield from sorted(results.items())

    def _merged_parameters(self, kwargs: dict[str, Any]) -> tuple[dict, dict, dict]:
        call = self._sanitize_parameters(**kwargs)
        return tuple({**default, **given} for default, given in zip(self._defaults, call))  # type: ignore[return-value]

    def _batches(self, inputs: Iterable[Any], fn: Callable, batch_size: int, num_workers: int) -> Iterator[tuple]:
        split = functools.partial(_split_collate, collate=self.collate)
        if isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
            dataset = _Preprocessed(inputs, fn)
            if num_workers > 0:
                yield from torch.utils.data.DataLoader(
                    dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=split,
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


def _split_collate(
    items: list[tuple[int, dict | None, InvalidInputError | None]], collate: Callable[[list], Any]
) -> tuple[list[int], Any, list[tuple[int, Exception]]]:
    """Set failed inputs aside and collate the rest (runs inside DataLoader workers)."""
    indices, samples, errors = [], [], []
    for index, sample, err in items:
        if err is not None:
            errors.append((index, err))
        else:
            indices.append(index)
            samples.append(sample)
    return indices, (collate(samples) if samples else None), errors


def _take(outputs: dict[str, Any], j: int) -> dict[str, Any]:
    return {k: v[j] if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in outputs.items()}


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    return value

