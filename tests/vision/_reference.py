"""The parity fixtures of ``../shared/reference`` (made with the official code; see its README),
read under the fixture rule of ``tests/helpers.py``: a missing folder or file skips the test, or
fails it where the fixtures are required."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tests.helpers import reference_path


def tolerance(cfg: dict[str, Any]) -> dict[str, float]:
    """``assert_close`` keywords from config.json's ``suggested_tolerance``."""
    tol = cfg["suggested_tolerance"]
    return {"atol": tol["atol"], "rtol": tol["rtol"]}


@dataclass
class Fixture:
    cfg: dict[str, Any]
    state_dict: dict[str, torch.Tensor] | None  # None where the weights ship as weights_recipe.json
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]

    @property
    def tolerance(self) -> dict[str, float]:
        return tolerance(self.cfg)


def load_fixture(reference_dir: Path, name: str) -> Fixture:
    folder = reference_path(reference_dir, name)
    cfg = json.loads(reference_path(folder, "config.json").read_text())
    state = folder / "state_dict.safetensors"
    return Fixture(
        cfg,
        load_file(state) if state.is_file() else None,
        load_file(reference_path(folder, "inputs.safetensors")),
        load_file(reference_path(folder, "outputs.safetensors")),
    )


def key_manifest(reference_dir: Path, folder: str, name: str) -> dict[str, Any]:
    """A full-size official variant's ``keys_<variant>.json``: ``keys`` ({shape, dtype} per key) and counts."""
    return json.loads(reference_path(reference_dir, folder, f"keys_{name}.json").read_text())


def manual_seed(note: str) -> int:
    """The seed of the ``torch.manual_seed(N)`` a fixture's config.json says the official run called."""
    found = re.search(r"torch\.manual_seed\((\d+)\)", note)
    assert found, f"config.json names no torch.manual_seed: {note!r}"
    return int(found.group(1))


def state_layout(state: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """A state dict as a key manifest lists it: shape and dtype per key."""
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()}


def assert_key_layout(model: torch.nn.Module, manifest: dict[str, Any]) -> None:
    """The model has exactly the manifest's keys, shapes and dtypes (buffers included) and parameter count."""
    assert state_layout(model.state_dict()) == manifest["keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["total_params"]


def load_files(reference_dir: Path, name: str) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """config.json and the fixture's tensor files by name (``state_dict`` only where one ships)."""
    f = load_fixture(reference_dir, name)
    files = {"inputs": f.inputs, "outputs": f.outputs}
    return f.cfg, files if f.state_dict is None else {"state_dict": f.state_dict, **files}
