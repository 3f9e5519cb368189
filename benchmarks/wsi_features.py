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
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.wsi_helpers import slide_image, write_slide  # noqa: E402  (the synthetic slide writer the tests use)


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
    args = p.parse_args()
    from attnzoo.datasets.wsi import PatchDataset, open_slide, patch_grid, segment_tissue
    from attnzoo.pipelines.wsi_features import create_patch_encoder, extract_features

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        n = args.size
        blobs = [
            (
                int(rng.uniform(0.2, 0.8) * n),
                int(rng.uniform(0.2, 0.8) * n),
                int(rng.uniform(0.08, 0.2) * n),
                int(rng.uniform(0.08, 0.2) * n),
                tuple(int(c) for c in rng.integers(120, 220, 3)),
            )
            for _ in range(6)
        ]
        slide_path = write_slide(
            Path(tmp) / "slide.tif",
            slide_image(args.size, args.size, blobs=blobs),
            downsamples=tuple(int(d) for d in args.downsamples.split(",")),
        )
        encoder = create_patch_encoder(args.encoder, weights="none").eval().to(device)
        slide = open_slide(slide_path)
        grid = patch_grid(
            slide, segment_tissue(slide, a_t=1), magnification=20, patch_size=224, read_level=args.read_level
        )
        patches = torch.stack([PatchDataset(slide, grid)[i][0] for i in range(len(grid))])  # in memory, preprocessed
        print(
            f"slide {args.size}x{args.size} px, levels 1,{args.downsamples}, {len(grid)} patches at 20x (read at level {grid.level}, "
            f"{grid.read_size} px), encoder {args.encoder}, batch {args.batch}, "
            f"workers {args.workers}, device {device}, threads {torch.get_num_threads()}"
        )
        bare, ours = [], []
        for r in range(args.rounds):
            start = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, len(patches), args.batch):
                    encoder(patches[i : i + args.batch].to(device))
            if device.type == "cuda":
                torch.cuda.synchronize()
            bare.append(len(patches) / (time.perf_counter() - start))
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


if __name__ == "__main__":
    main()
