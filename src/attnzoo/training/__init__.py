"""Training: one engine (loop, AMP, accumulation, EMA, schedules, atomic checkpoints, exact
resume, ``torchrun`` DDP, CSV/TensorBoard logs) and a recipe per task."""

from attnzoo.training.config import TrainConfig, apply_overrides, load_config, named_configs
from attnzoo.training.engine import Trainer, distributed_context, latest_checkpoint

__all__ = [
    "TrainConfig",
    "Trainer",
    "apply_overrides",
    "distributed_context",
    "latest_checkpoint",
    "load_config",
    "named_configs",
]
