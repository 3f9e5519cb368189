"""Patch feature extraction from a slide file against the bare encoder on the same patches already in
memory (goal >= 0.9x: reading and tiling hidden behind the encoder by the DataLoader workers).

Writes a synthetic pyramidal TIFF (OpenSlide reads it; by default with Camelyon16's pyramid, levels
at 2x steps, so 20x is read from level 1; ``--downsamples 4,16`` gives an Aperio .svs pyramid, where
20x is read at level 0 and resized, as is every slide with ``--read-level base``), then times, alternately:
- ``attnzoo.pipelines.wsi_features.extract_features`` (tissue segmentation, grid, workers reading patches, encoder, HDF5);
- the encoder alone over the same patches, preprocessed and stacked in memory beforehand.

    python benchmarks/wsi_features.py                      # CPU, resnet18 (random weights), 20x, 224 px
    python benchmarks/wsi_features.py --downsamples 4,16   # Aperio pyramid: 448 px read at level 0, resized
    python benchmarks/wsi_features.py --device cuda --batch 256 --size 16384
    python benchmarks/wsi_features.py --slide build/slide_8192.tif --size 8192   # written once, reused after

``--slide PATH``: time that slide (any file OpenSlide reads; ``--size`` and ``--downsamples`` are then
not used); a PATH that does not exist yet gets the synthetic slide written there and kept, so a later
run (a rerun on the same GPU machine) skips the writing.

Cohort mode (``--cohort N``): N synthetic slides (sides from half ``--size`` to ``--size``), extracted by
``attnzoo extract wsi-features`` as 1 process and as ``torchrun --nproc_per_node P`` for each P of
``--procs``, alternating, each into a fresh folder; prints slides per hour of the whole command (process
start, encoder, every slide, manifest) and of the extraction alone (the command's own summary). On the CPU
each of P processes gets cores/P threads (``--threads`` to fix them); on GPUs (``--device cuda``) each process takes its own GPU.

    python benchmarks/wsi_features.py --cohort 8 --size 4096                    # CPU: 1 vs 2 processes
    python benchmarks/wsi_features.py --cohort 64 --size 16384 --device cuda --procs 1,2,4 --batch 256
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.wsi_helpers import slide_image, write_slide  # noqa: E402  (the synthetic slide writer the tests use)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import device_name  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="slide side at level 0 (px, 0.25 um/px)")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--read-level", default="auto", choices=("auto", "base"))
    p.add_argument(
        "--downsamples",
        default="2,4,8,16",
        help="pyramid levels below level 0: 2,4,8,16 as Camelyon16's TIFFs (20x read from level 1), "
        "4,16 as a typical Aperio .svs (20x read from level 0 and resized)",
    )
    p.add_argument("--slide", type=Path, default=None, help="reuse this slide (written there first if missing)")
    p.add_argument("--cohort", type=int, default=0, help="cohort mode: this many slides, 1 vs --procs processes")
    p.add_argument("--procs", default="2", help="cohort mode: process counts to compare with 1, e.g. 2 or 2,4")
    p.add_argument(
        "--threads", type=int, default=0, help="cohort mode: torch threads per process (0: cores / processes)"
    )
    args = p.parse_args()
    if args.cohort:
        cohort(args)
        return
    from attnzoo.datasets.wsi import PatchDataset, open_slide, patch_grid, segment_tissue
    from attnzoo.pipelines.wsi_features import create_patch_encoder, extract_features

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        slide_path = args.slide or Path(tmp) / "slide.tif"
        synthetic = not slide_path.exists()
        if synthetic:  # written beside and renamed: a run killed while writing leaves no half slide to reuse
            slide_path.parent.mkdir(parents=True, exist_ok=True)
            partial = slide_path.with_name(f"{slide_path.stem}.partial{slide_path.suffix}")
            os.replace(write_blob_slide(partial, args.size, args.size, 0, args.downsamples), slide_path)
        encoder = create_patch_encoder(args.encoder, weights="none").eval().to(device)
        slide = open_slide(slide_path)
        width, height = slide.dimensions
        levels = args.downsamples if synthetic else ",".join(f"{d:g}" for d in slide.level_downsamples[1:])
        grid = patch_grid(
            slide, segment_tissue(slide, a_t=1), magnification=20, patch_size=224, read_level=args.read_level
        )
        patches = torch.stack([PatchDataset(slide, grid)[i][0] for i in range(len(grid))])  # in memory, preprocessed
        print(
            f"slide {width}x{height} px, levels 1,{levels}, {len(grid)} patches at 20x (read at level {grid.level}, "
            f"{grid.read_size} px), encoder {args.encoder}, batch {args.batch}, "
            f"workers {args.workers}, device {device_name(device)}, threads {torch.get_num_threads()}"
        )

        def bare_pass() -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, len(patches), args.batch):
                    encoder(patches[i : i + args.batch].to(device))
            if device.type == "cuda":
                torch.cuda.synchronize()
            return len(patches) / (time.perf_counter() - start)

        if device.type == "cuda":  # untimed: CUDA context, cuDNN's algorithm choice per batch shape
            bare_pass()
        bare, ours = [], []
        for r in range(args.rounds):
            bare.append(bare_pass())
            start = time.perf_counter()
            extract_features(
                slide_path,
                encoder,
                Path(tmp) / f"feats{r}.h5",
                magnification=20,
                patch_size=224,
                read_level=args.read_level,
                batch_size=args.batch,
                num_workers=args.workers,
                device=device,
                progress=False,
                segment_kwargs={"a_t": 1},
            )
            ours.append(len(patches) / (time.perf_counter() - start))
        b, o = statistics.median(bare), statistics.median(ours)
        print(f"bare encoder on in-memory patches: {b:.1f} patches/s   extraction from the slide: {o:.1f} patches/s")
        print(f"extraction vs bare encoder: {o / b:.3f}x")


def write_blob_slide(path: Path, width: int, height: int, seed: int, downsamples: str) -> Path:
    """A synthetic slide with six random tissue blobs, with the pyramid levels ``downsamples`` ("2,4,8,16")."""
    rng = np.random.default_rng(seed)
    blobs = [
        (
            int(rng.uniform(0.2, 0.8) * width),
            int(rng.uniform(0.2, 0.8) * height),
            int(rng.uniform(0.08, 0.2) * width),
            int(rng.uniform(0.08, 0.2) * height),
            tuple(int(c) for c in rng.integers(120, 220, 3)),
        )
        for _ in range(6)
    ]
    levels = tuple(int(d) for d in downsamples.split(","))
    return write_slide(path, slide_image(width, height, blobs=blobs, seed=seed), downsamples=levels)


def cohort(args: argparse.Namespace) -> None:
    """Slides per hour of ``attnzoo extract wsi-features`` as 1 process and as P torchrun processes."""
    procs = [1, *(int(n) for n in args.procs.split(",") if int(n) != 1)]
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        slides = Path(tmp) / "slides"
        slides.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.cohort):
            side = int(rng.uniform(args.size / 2, args.size)) // 256 * 256
            write_blob_slide(slides / f"slide_{i:03d}.tif", side, side, i, args.downsamples)
        command = ["-m", "attnzoo.cli", "extract", "wsi-features", str(slides), "--encoder", args.encoder, "-w", "none"]
        command += ["--batch-size", str(args.batch), "--num-workers", str(args.workers), "--device", args.device]
        command += ["--read-level", args.read_level, "--segment", "a_t=0.1"]
        print(
            f"{args.cohort} slides of {args.size // 2}-{args.size} px (levels 1,{args.downsamples}), "
            f"{args.encoder}, batch {args.batch}, {args.workers} workers per process, {args.device}, {cores} cores, "
            f"{f'{args.threads} threads' if args.threads else 'cores / processes threads'} per process"
        )
        wall: dict[int, list[float]] = {n: [] for n in procs}
        inside: dict[int, list[float]] = {n: [] for n in procs}
        for r in range(args.rounds):
            for n in procs:
                launcher = [sys.executable]
                if n > 1:
                    launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or max(1, cores // n))}
                start = time.perf_counter()
                done = subprocess.run(
                    [*launcher, *command, "--out", str(Path(tmp) / f"out_{n}_{r}")],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                seconds = time.perf_counter() - start
                if done.returncode != 0 or " 0 failed" not in done.stdout:
                    sys.exit(f"{n} process(es) failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
                wall[n].append(args.cohort / seconds * 3600)
                inside[n].append(float(re.search(r"([\d.]+) slides/h over", done.stdout).group(1)))
        for n in procs:
            print(
                f"{n} process{'es' if n > 1 else ''}: {statistics.median(wall[n]):.0f} slides/h (whole command), "
                f"{statistics.median(inside[n]):.0f} slides/h (extraction, the command's summary)"
            )
        for n in procs[1:]:
            print(
                f"{n} vs 1 process: {statistics.median(wall[n]) / statistics.median(wall[1]):.2f}x (whole command), "
                f"{statistics.median(inside[n]) / statistics.median(inside[1]):.2f}x (extraction)"
            )


if __name__ == "__main__":
    main()
