"""The image-classification recipe: ImageNet layouts or any ImageFolder, timm's augmentation
(RandAugment, random erasing, mixup/cutmix, label smoothing), EMA, top-1/top-5 on the val split.

    attnzoo train image-classification --model biformer_tiny --data DIR --out runs/bt --config biformer
    attnzoo train image-classification --model biformer_tiny --weights PATH --data MYFOLDER --out runs/ft   # fine-tune
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from attnzoo._placement import resolve_device
from attnzoo.datasets.image_folder import ClassificationSamples, align_classes, class_keys, empty_class_folders
from attnzoo.datasets.imagenet import read_classification_folder
from attnzoo.datasets.images import load_image, opened_image
from attnzoo.errors import DatasetFormatError, InvalidInputError, InvalidOptionError, WeightsError
from attnzoo.training.config import TrainConfig, recipe_config
from attnzoo.training.engine import (
    Trainer,
    check_run_folder,
    failed_checks,
    refuse_failures,
    run_inputs,
    seed_everything,
    typed_batches,
)

__all__ = ["TransformedSamples", "train_classification"]

_logger = logging.getLogger(__name__)
RECIPE_DEFAULTS = {
    "input_size": 224,
    "interpolation": "bicubic",
    "auto_augment": None,
    "color_jitter": 0.0,
    "reprob": 0.0,
    "remode": "const",  # random erasing's fill: timm's default; the official DeiT-style recipes use "pixel"
    "mixup": 0.0,
    "cutmix": 0.0,
    "smoothing": 0.0,
    "drop_path": 0.0,
    "eval_batch_size": 64,
    "check_images": True,  # open every train/val image before any work (false: a damaged one fails when read)
    # Sparsifiner's two phases (official default config): "reconstruction", then "distill" from a dense teacher
    "sparsifiner_phase": None,
    "attn_recon_weight": 0.01,
    "teacher": None,
    "teacher_weights": None,
    "cls_weight": 1.0,
    "cls_distill_weight": 0.5,
    "token_distill_weight": 0.5,
}
#: Allowed values of the recipe settings that are sizes, counts, probabilities or strengths.
RECIPE_RANGES = {
    "input_size": (1, None),
    "eval_batch_size": (1, None),
    "color_jitter": (0.0, None),
    "reprob": (0.0, 1.0),
    "mixup": (0.0, None),
    "cutmix": (0.0, None),
    "smoothing": (0.0, 1.0),
    "drop_path": (0.0, 1.0),
}
#: Random erasing's fills (timm's ``re_mode``): zeros, one random colour per box, or per-pixel noise.
ERASE_MODES = ("const", "rand", "pixel")
#: What the validation (:class:`_TopK`) reports: the names ``best_metric`` may take.
METRICS = ("top1", "top5")
#: Which way each metric improves (``best_mode`` follows ``best_metric``'s).
METRIC_MODES = {"top1": "max", "top5": "max"}
#: The recipe settings a resumed run may change: they touch neither the trained steps nor what the validation
#: measures (the evaluation batch size, the check of the images before any work).
RESUMABLE = ("eval_batch_size", "check_images")


class TransformedSamples(Dataset):
    """``(path, target)`` samples as ``(tensor, target)`` through ``transform`` (picklable, for workers)."""

    def __init__(self, samples: ClassificationSamples, transform: Any):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[i]
        return self.transform(load_image(path)), target


def _split(data: Path, split: str) -> ClassificationSamples | None:
    if split == "val" and not (data / "val").is_dir():
        return None
    samples = read_classification_folder(data, split)
    return samples if len(samples) else None


def _training_split(root: Path) -> ClassificationSamples:
    """The training split; an empty class folder is refused (a class the model would learn without an example)."""
    samples = _split(root, "train")
    if samples is None:
        raise DatasetFormatError(
            f"{root}: no training images (expected {root}/train/<class>/<image> or {root}/<class>/<image>)"
        )
    empty = empty_class_folders(samples)
    if empty:
        raise DatasetFormatError(
            f"{samples.root}: class folder(s) {', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''} hold no "
            "images; a class without training examples cannot be learned: add its images or remove the folder"
        )
    return samples


def _evaluation_split(root: Path, split: str, train: ClassificationSamples) -> ClassificationSamples | None:
    """``split`` with targets by the TRAINING classes (matched by folder name): read on its own, a split lacking a
    class would number the later ones differently. A class the training split lacks is refused; training classes
    the split lacks are logged."""
    samples = _split(root, split)
    if samples is None:
        return None
    samples, missing = align_classes(samples, train, split=split)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        _logger.warning(
            "the %s split has no images of %d of the %d training classes (%s); it scores the others",
            split,
            len(missing),
            len(train.classes),
            shown,
        )
    return samples


def _check_image(path: Path) -> None:
    """Refuse a file PIL cannot open (not an image, a damaged header, over the pixel limit) or, for the formats
    whose ``verify`` reads the data (PNG's checksums), a damaged one -- but only what decoding refuses too:
    ``verify`` is stricter than the loader (a PNG without its end marker, a bad checksum on a text chunk), so a
    file it fails is decoded and refused only if that fails. Reads the header only for JPEG: a JPEG cut short
    passes, and fails when it is decoded."""
    with opened_image(path, error=DatasetFormatError) as image:
        try:
            image.verify()
            return
        except Exception:  # noqa: BLE001 - whatever verify raises, decoding decides below
            pass
    with opened_image(path, error=DatasetFormatError) as image:
        image.load()


def _check_readable(samples: ClassificationSamples, split: str, num_workers: int) -> None:
    """Refuse, before any work, a split holding files PIL cannot open: a damaged validation image failed the
    first validation, after an epoch of training, and a training one part-way through it. Every file is checked
    (its header, about 60-130 us each on a local disk), in ``num_workers`` processes; every damaged one is named."""
    start = time.perf_counter()
    failures = failed_checks(samples.paths, _check_image, num_workers=num_workers)
    _logger.info("checked the %d %s images in %.1f s", len(samples), split, time.perf_counter() - start)
    refuse_failures(failures, len(samples), f"{split} images")


def _transform_record(size: int, data_cfg: dict[str, Any]) -> dict[str, Any]:
    """The validation transform's settings, as the run's config.yaml records them (``run.eval_transform``): the
    run's weights are preprocessed by them (``attnzoo.create_model`` reads them back)."""
    return {
        "input_size": size,
        "interpolation": str(data_cfg["interpolation"]),
        "crop_pct": float(data_cfg["crop_pct"]),
        "crop_mode": "center",
        "mean": [float(v) for v in data_cfg["mean"]],
        "std": [float(v) for v in data_cfg["std"]],
    }


class _ClassificationLoss:
    def __init__(self, mixup: Any, smoothing: float):
        self.mixup, self.smoothing = mixup, smoothing

    def __call__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if self.mixup is not None:
            x, soft = self.mixup(x, y)
            return torch.sum(-soft * F.log_softmax(model(x), dim=-1), dim=-1).mean()
        return F.cross_entropy(model(x), y, label_smoothing=self.smoothing)


class _SparsifinerReconstructionLoss:
    """Phase 1: the connectivity predictors regress each layer's dense attention rows (cls row
    dropped) with a sum-reduced MSE, averaged over layers, times 0.01 (the official loss). The
    backbone runs dense and frozen, so its own attention is the dense teacher's. The images are
    mixed as in every official phase (the labels go unused)."""

    def __init__(self, weight: float, mixup: Any):
        self.weight, self.mixup = weight, mixup

    def __call__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = batch[0] if self.mixup is None else self.mixup(*batch)[0]
        out = model(x, dense_attn=True)
        layers = [
            F.mse_loss(a, d[..., 1:, :].detach(), reduction="sum")
            for a, d in zip(out.approx_attn, out.dense_attn, strict=True)
        ]
        return self.weight * torch.stack(layers).mean()


class _SparsifinerDistillLoss:
    """Phase 2: CE (soft targets under mixup) + KL(student || dense teacher) on logits
    (batchmean, log-space target) + MSE between the final patch tokens, as the official ``NewLoss``."""

    def __init__(self, teacher: torch.nn.Module, mixup: Any, smoothing: float, weights: tuple[float, float, float]):
        self.teacher, self.mixup, self.smoothing, self.weights = teacher.eval(), mixup, smoothing, weights

    def __call__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        out = model(x, detailed=True)
        with torch.no_grad():
            self.teacher.to(x.device)
            tokens_t = self.teacher.forward_features(x)
            logits_t = self.teacher.forward_head(tokens_t)
        if y.dim() == 2:
            cls = torch.sum(-y * F.log_softmax(out.logits, dim=-1), dim=-1).mean()
        else:
            cls = F.cross_entropy(out.logits, y, label_smoothing=self.smoothing)
        kl = F.kl_div(
            F.log_softmax(out.logits, dim=-1), F.log_softmax(logits_t, dim=-1), reduction="batchmean", log_target=True
        )
        tokens = F.mse_loss(out.features.flatten(0, 1), tokens_t[:, 1:].flatten(0, 1))
        w_cls, w_kl, w_tok = self.weights
        return w_cls * cls + w_kl * kl + w_tok * tokens


class _TopK:
    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, device: torch.device):
        self.dataset, self.batch_size, self.num_workers, self.device = dataset, batch_size, num_workers, device

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        hits1 = hits5 = n = 0
        for x, y in typed_batches(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers):
            logits = model(x.to(self.device))
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu()
            hits1 += int((top[:, 0] == y).sum())
            hits5 += int((top == y[:, None]).any(-1).sum())
            n += len(y)
        return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n}


def _teacher(
    student: torch.nn.Module, extra: dict[str, Any], num_classes: int, kwargs: dict[str, Any]
) -> torch.nn.Module:
    """The dense DeiT teacher: timm's ViT with the student's backbone dimensions, from ``teacher_weights``."""
    from timm.models.vision_transformer import VisionTransformer

    import attnzoo
    from attnzoo.vision.sparsifiner import SparsifinerLVViT

    if isinstance(student, SparsifinerLVViT):
        raise InvalidInputError(
            "sparsifiner_phase=distill distils from a dense DeiT teacher; the LV-ViT student's own recipe "
            "(a dense LV-ViT teacher with token labelling) is not implemented: run the reconstruction phase, "
            "then fine-tune without sparsifiner_phase"
        )
    if extra["teacher_weights"] is None:
        raise InvalidInputError(
            "sparsifiner_phase=distill needs teacher_weights=PATH (the dense DeiT checkpoint the student started from)"
        )
    block = student.blocks[0]
    teacher = VisionTransformer(
        img_size=student.img_size,
        patch_size=student.patch_embed.patch_size,
        embed_dim=student.embed_dim,
        depth=len(student.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / student.embed_dim,
        num_classes=student.num_classes,
    )
    attnzoo.weights.load_weights(teacher, extra["teacher_weights"], converter=_dense_filter)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _dense_filter(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A DeiT checkpoint as released, or a Sparsifiner's backbone (predictors dropped)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = state.get("model", state)
    return checkpoint_filter_fn(
        {k.removeprefix("module."): v for k, v in state.items() if ".mask_predictor." not in k}, model
    )


def train_classification(
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
    """Train (or fine-tune, with ``weights``) ``model`` on ``data/train``, evaluating on ``data/val``.
    ``overwrite`` discards an earlier run in ``out`` (else refused, unless ``resume``)."""
    from timm.data import Mixup, create_transform, resolve_data_config

    import attnzoo

    cfg = recipe_config(
        config,
        overrides,
        RECIPE_DEFAULTS,
        "image-classification",
        metrics=METRICS,
        ranges=RECIPE_RANGES,
        metric_modes=METRIC_MODES,
    )
    extra = cfg.extra
    if extra["remode"] not in ERASE_MODES:
        raise InvalidOptionError(f"remode must be one of {', '.join(ERASE_MODES)}, got {extra['remode']!r}")
    root = Path(data)
    folder: dict[str, Any] = {"data": root, "inputs": run_inputs(config, weights, cfg)}
    check_run_folder(out, resume=resume, overwrite=overwrite, **folder)
    train_samples = _training_split(root)
    val_samples = _evaluation_split(root, "val", train_samples)
    if extra["check_images"]:
        for split, samples in (("val", val_samples), ("training", train_samples)):
            if samples is not None:
                _check_readable(samples, split, cfg.num_workers)
    else:  # a damaged image fails when it is read: the steps done are saved first (Trainer)
        _logger.info("check_images=false: the images are not checked before training")
    num_classes = len(train_samples.classes)

    seed_everything(cfg.seed)  # the seed decides the initial weights (a new head's too), as the official scripts
    kwargs = dict(model_kwargs or {})
    if extra["drop_path"]:
        kwargs.setdefault("drop_path_rate", extra["drop_path"])
    if weights is not None:  # fine-tuning: a checkpoint with other classes (e.g. ImageNet's 1000) gets a new head
        try:
            net = attnzoo.create_model(model, weights=weights, num_classes=num_classes, **kwargs)
        except WeightsError:
            net = attnzoo.create_model(model, weights=weights, **kwargs)
            if net.num_classes == num_classes:
                raise
            net.reset_classifier(num_classes)
    else:
        net = attnzoo.create_model(model, num_classes=num_classes, **kwargs)
    net.train()

    size = int(extra["input_size"])
    data_cfg = resolve_data_config({"input_size": (3, size, size)}, model=net)
    train_tf = create_transform(
        (3, size, size),
        is_training=True,
        auto_augment=extra["auto_augment"],
        interpolation=extra["interpolation"],
        color_jitter=extra["color_jitter"] or None,
        re_prob=extra["reprob"],
        re_mode=extra["remode"],
        mean=data_cfg["mean"],
        std=data_cfg["std"],
    )
    eval_tf = create_transform(
        (3, size, size),
        is_training=False,
        interpolation=data_cfg["interpolation"],
        crop_pct=data_cfg["crop_pct"],
        mean=data_cfg["mean"],
        std=data_cfg["std"],
    )
    mixup = None
    if extra["mixup"] > 0 or extra["cutmix"] > 0:
        mixup = Mixup(
            mixup_alpha=extra["mixup"],
            cutmix_alpha=extra["cutmix"],
            label_smoothing=extra["smoothing"],
            num_classes=num_classes,
        )
    loss_fn: Any = _ClassificationLoss(mixup, extra["smoothing"])
    phase = extra["sparsifiner_phase"]
    if phase is not None:
        if not hasattr(net, "set_phase"):
            raise InvalidInputError(f"sparsifiner_phase={phase!r} needs a Sparsifiner model, not {model}")
        if phase == "reconstruction":
            net.set_phase("reconstruction")
            loss_fn = _SparsifinerReconstructionLoss(extra["attn_recon_weight"], mixup)
        elif phase == "distill":
            net.set_phase("sparse")
            loss_fn = _SparsifinerDistillLoss(
                _teacher(net, extra, num_classes, kwargs),
                mixup,
                extra["smoothing"],
                (extra["cls_weight"], extra["cls_distill_weight"], extra["token_distill_weight"]),
            )
        else:
            raise InvalidInputError(f"sparsifiner_phase must be 'reconstruction' or 'distill', got {phase!r}")
    trainer_device = resolve_device(device) if device is not None else None
    trainer = Trainer(
        net,
        TransformedSamples(train_samples, train_tf),
        cfg,
        out,
        loss_fn=loss_fn,
        device=trainer_device,
        run_info={
            "task": "image-classification",
            "model": model,
            "data": str(Path(root).resolve()),
            "classes": train_samples.classes,
            **({"class_ids": ids} if (ids := class_keys(train_samples)) != list(train_samples.classes) else {}),
            "weights": None if weights is None else str(weights),
            "eval_transform": _transform_record(size, data_cfg),
        },
        recipe_defaults=RECIPE_DEFAULTS,
        resumable=RESUMABLE,
        **folder,
    )
    if mixup is not None and (cfg.batch_size // (cfg.accum_steps * trainer.ctx.world_size)) % 2:
        raise InvalidInputError("mixup/cutmix need an even batch per process and accumulation step")
    if val_samples is not None:
        trainer.eval_fn = _TopK(
            TransformedSamples(val_samples, eval_tf), int(extra["eval_batch_size"]), cfg.num_workers, trainer.device
        )
    elif cfg.best_metric:
        _logger.warning("no %s/val split: training without evaluation", root)
    result = trainer.fit(resume=resume, overwrite=overwrite)
    trainer.save_weights()
    return {**result, "classes": train_samples.classes}
