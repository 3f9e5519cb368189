"""The multi-view 3D reconstruction recipe (LRGT on ShapeNet), as the official ``config.py`` trains it:
Dice loss, AdamW 1e-4, MultiStepLR [60, 90], 3 random views per model on a random light background,
validation IoU (max over thresholds) with the first 3 views. The encoder starts from DeiT-B
distilled ImageNet weights (:func:`load_deit_init`), as the official training does.

    attnzoo train multiview-3d-reconstruction --data /data/shapenet --out runs/lrgt --config lrgt
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from attnzoo._placement import resolve_device
from attnzoo._values import whole_number
from attnzoo.errors import DatasetFormatError, InvalidInputError, InvalidOptionError, WeightsError
from attnzoo.training.config import TrainConfig, recipe_config
from attnzoo.training.engine import (
    Trainer,
    check_run_folder,
    failed_checks,
    refuse_failures,
    run_inputs,
    seed_everything,
)

if TYPE_CHECKING:  # pragma: no cover
    from attnzoo.vision.lrgt import LRGTViT

__all__ = ["DEIT_INIT_URL", "dice_loss", "load_deit_init", "train_reconstruction"]

_logger = logging.getLogger(__name__)

DEIT_INIT_URL = "https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_224-df68dfff.pth"

RECIPE_DEFAULTS = {
    "n_views": 3,
    "deit_weights": None,
    "train_background": [225, 255],
    "eval_background": 240,
    "eval_batch_size": 8,
    "check_images": True,  # read every validation model's files before any work (false: a damaged one fails there)
}
RECIPE_RANGES = {"n_views": (1, None), "eval_batch_size": (1, None), "eval_background": (0, 255)}
#: What the validation (:class:`_ValidationIoU`) reports: the names ``best_metric`` may take.
METRICS = ("iou",)
#: Which way each metric improves (``best_mode`` follows ``best_metric``'s).
METRIC_MODES = {"iou": "max"}
#: The recipe settings a resumed run may change: the evaluation batch size, the check of the validation files
#: before any work, and the DeiT initialisation (the checkpoint replaces the initial weights).
RESUMABLE = ("eval_batch_size", "check_images", "deit_weights")


def dice_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official "Dice": ``1 - (sum(p g) + 1) / (sum(p^2 + g^2) + 1)`` per sample (no factor 2), batch mean."""
    p, g = pred.flatten(1), target.flatten(1)
    return (1 - ((p * g).sum(1) + 1) / ((p * p + g * g).sum(1) + 1)).mean()


def _vit_of(model: nn.Module) -> LRGTViT:
    from attnzoo.vision.lrgt import LRGT, LRGTEncoder, LRGTViT

    if isinstance(model, LRGT):
        return model.encoder.encoder
    if isinstance(model, LRGTEncoder):
        return model.encoder
    if isinstance(model, LRGTViT):
        return model
    raise InvalidInputError(f"load_deit_init needs an LRGT, LRGTEncoder or LRGTViT, got {type(model).__name__}")


def load_deit_init(
    model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any] = DEIT_INIT_URL
) -> dict[str, list[str]]:
    """The official ImageNet initialisation of the encoder: DeiT-B *distilled* weights (the
    released ``{'model': ...}`` file, a timm state dict, a path, URL or ``hf-hub:`` spec).

    Each block's fused ``attn.qkv`` is split into thirds for ``to_q``/``to_k``/``to_v``; ``head``
    and ``head_dist`` are ignored; parameters DeiT lacks (the IFS convs) keep their init. A shape
    mismatch (another DeiT size) is an error. Returns the keys ``loaded``, ``ignored`` and ``kept``.
    """
    from attnzoo.weights import load_checkpoint, unwrap_state_dict

    vit = _vit_of(model)
    obj: Any = checkpoint if isinstance(checkpoint, Mapping) else load_checkpoint(checkpoint)
    source = unwrap_state_dict(obj)
    own = vit.state_dict()
    new: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for name, tensor in source.items():
        if ".attn.qkv." in name:
            parts = tensor.chunk(3, dim=0)
            for proj, part in zip(("to_q", "to_k", "to_v"), parts):
                new[name.replace(".qkv.", f".{proj}.")] = part
        elif name in own:
            new[name] = tensor
        else:
            ignored.append(name)
    unknown = [k for k in new if k not in own]
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in new.items() if k in own and v.shape != own[k].shape
    ]
    if unknown or bad:
        raise WeightsError(
            f"the DeiT checkpoint does not fit this LRGT encoder: {', '.join((unknown + bad)[:5])}"
            f"{' ...' if len(unknown + bad) > 5 else ''} (the official init is DeiT-B distilled, 768 wide)"
        )
    if not new:
        raise WeightsError("the DeiT checkpoint holds no encoder weights")
    with torch.no_grad():
        for k, v in new.items():
            own[k].copy_(v)
    return {"loaded": sorted(new), "ignored": sorted(ignored), "kept": sorted(k for k in own if k not in new)}


class ViewsTransform:
    """The official training preprocessing: each view on its own random background (per channel,
    uniform in ``[low, high]``), or the fixed test colour, resized to ``size`` (the side the model
    was built at: :func:`attnzoo.pipelines.multiview_reconstruction.input_side`; 224 as released).
    Picklable for DataLoader workers."""

    def __init__(self, background: int | list[int], size: int = 224):
        self.background = background
        self.size = size

    def __call__(self, views: list[np.ndarray]) -> torch.Tensor:
        from attnzoo.pipelines.multiview_reconstruction import preprocess_views

        if isinstance(self.background, (list, tuple)):
            low, high = self.background
            return torch.cat(
                [
                    preprocess_views(
                        [v],
                        background=tuple(int(c) for c in np.random.randint(low, high + 1, 3)),
                        size=self.size,
                    )
                    for v in views
                ]
            )
        return preprocess_views(views, background=self.background, size=self.size)


def _background_range(value: Any) -> list[int]:
    """``train_background``: the ``[low, high]`` range of each channel's random background (0-255)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InvalidOptionError(f"train_background must be [low, high] (0-255 grey levels), got {value!r}")
    low, high = (whole_number(v, f"train_background[{i}]", low=0, high=255) for i, v in enumerate(value))
    if low > high:
        raise InvalidOptionError(f"train_background must be [low, high] with low <= high, got {value!r}")
    return [low, high]


def _batch(items: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([i["views"] for i in items]), torch.stack([torch.from_numpy(i["voxels"]) for i in items])


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    views, voxels = batch
    return dice_loss(model(views), voxels)


class _ValidationIoU:
    def __init__(self, dataset: Any, batch_size: int, device: torch.device):
        self.dataset, self.batch_size, self.device = dataset, batch_size, device

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        from attnzoo.metrics.reconstruction import summarize_iou, voxel_iou

        ious, ids = [], []
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=lambda items: items)
        for items in loader:
            views, voxels = _batch(items)
            pred = model(views.to(self.device)).float().cpu()
            ious.append(voxel_iou(pred.numpy(), voxels.numpy()))
            ids += [i["taxonomy_id"] for i in items]
        summary = summarize_iou(np.concatenate(ious), ids)
        return {"iou": float(summary["max_iou"])}


def _read_model_files(files: tuple[list[Path], Path]) -> None:
    """Read one validation model's renderings and voxel grid as the validation will (DatasetFormatError if not)."""
    from attnzoo.datasets.binvox import read_binvox
    from attnzoo.datasets.shapenet import read_rendering

    renderings, voxels = files
    for path in renderings:
        read_rendering(path)
    read_binvox(voxels)


def _check_validation_files(val: Any, num_workers: int) -> None:
    """Refuse, before any work, validation models whose renderings or voxel grid cannot be read: the first
    validation met them after an epoch of training. Each file is decoded (ShapeNet's are small: a few hundred
    microseconds a model); every damaged one is named."""
    start = time.perf_counter()
    items = [([m.rendering_path(v) for v in val.view_indices(i)], m.voxel_path) for i, m in enumerate(val.samples)]
    failures = failed_checks(items, _read_model_files, num_workers=num_workers)
    _logger.info("checked the %d validation models in %.1f s", len(items), time.perf_counter() - start)
    refuse_failures(failures, len(items), "validation models")


def train_reconstruction(
    model: str,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: str | os.PathLike | TrainConfig | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    weights: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    device: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train ``model`` (default LRGT) on ``data`` (ShapeNetRendering/, ShapeNetVox32/, ShapeNet.json).
    ``overwrite`` discards an earlier run in ``out`` (else refused, unless ``resume``)."""
    import attnzoo
    from attnzoo.datasets.shapenet import ShapeNetDataset, find_split_file
    from attnzoo.pipelines.multiview_reconstruction import input_side

    cfg = recipe_config(
        config or "lrgt",
        overrides,
        RECIPE_DEFAULTS,
        "multiview-3d-reconstruction",
        metrics=METRICS,
        ranges=RECIPE_RANGES,
        metric_modes=METRIC_MODES,
    )
    extra = cfg.extra
    extra["train_background"] = _background_range(extra["train_background"])
    root = Path(data)
    folder: dict[str, Any] = {"data": root, "inputs": run_inputs(config, weights, cfg)}
    check_run_folder(out, resume=resume, overwrite=overwrite, **folder)
    split_file = find_split_file(root)
    # the views' side is the model's, set once it is built (below); the data is checked before that
    train_views = ViewsTransform(list(extra["train_background"]))
    val_views = ViewsTransform(int(extra["eval_background"]))
    train = ShapeNetDataset(
        root / "ShapeNetRendering",
        root / "ShapeNetVox32",
        split_file,
        split="train",
        n_views=int(extra["n_views"]),
        transform=train_views,
        seed=cfg.seed,
    )
    try:
        val = ShapeNetDataset(
            root / "ShapeNetRendering",
            root / "ShapeNetVox32",
            split_file,
            split="val",
            n_views=int(extra["n_views"]),
            view_selection="first",
            transform=val_views,
        )
    except DatasetFormatError:  # no val models: train without validation
        val = None
    if val is not None and extra["check_images"]:
        _check_validation_files(val, cfg.num_workers)
    seed_everything(cfg.seed)  # the seed decides the initial weights, as the official scripts
    net = (
        attnzoo.create_model(model, weights=weights, **(model_kwargs or {}))
        if weights
        else attnzoo.create_model(model, **(model_kwargs or {}))
    )
    # the side the model was built at (LRGT's img_size, in its pretrained_cfg), as the pipeline feeds it
    train_views.size = val_views.size = input_side(net)
    if weights is None and extra["deit_weights"]:
        load_deit_init(net, extra["deit_weights"])
    net.train()
    trainer = Trainer(
        net,
        train,
        cfg,
        out,
        loss_fn=_loss,
        collate_fn=_batch,
        device=resolve_device(device) if device is not None else None,
        run_info={
            "task": "multiview-3d-reconstruction",
            "model": model,
            "data": str(Path(root).resolve()),
            "weights": None if weights is None else str(weights),
        },
        recipe_defaults=RECIPE_DEFAULTS,
        resumable=RESUMABLE,
        **folder,
    )
    if val is not None:
        trainer.eval_fn = _ValidationIoU(val, int(extra["eval_batch_size"]), trainer.device)
    result = trainer.fit(resume=resume, overwrite=overwrite)
    trainer.save_weights()
    return result
