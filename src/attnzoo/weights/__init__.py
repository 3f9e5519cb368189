"""Official checkpoints: registry, download/cache/verify, safe loading and conversion."""

from attnzoo.weights.convert import convert_checkpoint, save_state_dict
from attnzoo.weights.hub import (
    attnzoo_home,
    checkpoints_dir,
    download_url,
    hf_download,
    hub_reachable,
    is_offline,
    sha256_file,
    verify_file,
)
from attnzoo.weights.loading import (
    describe_mismatch,
    fetch_checkpoint,
    load_checkpoint_file,
    load_weights,
    resolve_checkpoint,
    unwrap_state_dict,
)
from attnzoo.weights.registry import (
    CheckpointEntry,
    PreprocessConfig,
    default_checkpoint,
    get_checkpoint,
    is_checkpoint,
    list_checkpoints,
    register_checkpoint,
    register_checkpoints,
    unregister_checkpoint,
)

__all__ = [
    "CheckpointEntry",
    "PreprocessConfig",
    "attnzoo_home",
    "checkpoints_dir",
    "convert_checkpoint",
    "default_checkpoint",
    "describe_mismatch",
    "download_url",
    "fetch_checkpoint",
    "get_checkpoint",
    "hf_download",
    "hub_reachable",
    "is_checkpoint",
    "is_offline",
    "list_checkpoints",
    "load_checkpoint_file",
    "load_weights",
    "register_checkpoint",
    "register_checkpoints",
    "resolve_checkpoint",
    "save_state_dict",
    "sha256_file",
    "unregister_checkpoint",
    "unwrap_state_dict",
    "verify_file",
]
