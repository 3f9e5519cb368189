"""Evaluation throughput: attnzoo's runner against a plain hand-written DataLoader loop.

Both sides use the same model, the same timm eval transform, the same batch size and the
same number of DataLoader workers over the same tiny ImageNet-layout folder (written
here from scikit-image's photographs). The ratio ours / baseline should be >= 0.95: the
runner (error capture, JSONL predictions, resumability) must add no measurable overhead.

    python benchmarks/eval_classification.py --model resnet18 --images 256 --batch-size 32
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_imagenet_folder(root: Path, n: int, seed: int = 0) -> None:
    from skimage import data

    from attnzoo.datasets.imagenet import imagenet_synsets

    wnids = imagenet_synsets()[0]
    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        y, x = rng.integers(0, h // 4), rng.integers(0, w // 4)
        crop = Image.fromarray(photo[y : y + 3 * h // 4, x : x + 3 * w // 4]).resize((375, 500)[:: 1 if i % 2 else -1])
        folder = root / "val" / wnids[int(rng.integers(0, 1000))]
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"ILSVRC2012_val_{i:08d}.JPEG", quality=90)


class _Files(torch.utils.data.Dataset):
    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, target = self.samples[i]
        return self.transform(Image.open(path).convert("RGB")), target


def baseline(model, samples, transform, batch_size: int, workers: int) -> float:
    """What a researcher writes by hand: DataLoader + forward + top-1/top-5 counting."""
    device = next(model.parameters()).device  # the pipeline's: the batches go where the model is
    loader = torch.utils.data.DataLoader(
        _Files(samples, transform), batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda"
    )
    start, correct = time.perf_counter(), 0
    with torch.inference_mode():
        for x, y in loader:
            top5 = model(x.to(device, non_blocking=True)).topk(5, dim=-1).indices
            correct += int((top5[:, 0] == y.to(device)).sum())  # int(): a sync per batch, so the time is complete
    return len(samples) / (time.perf_counter() - start)


def ours(pipe, evaluator, out: Path, batch_size: int, workers: int) -> float:
    from attnzoo.evaluation import evaluate

    start = time.perf_counter()
    metrics = evaluate(
        pipe, evaluator, out, settings={}, batch_size=batch_size, num_workers=workers, overwrite=True, progress=False
    )
    assert metrics["n"] == len(evaluator.samples())
    return metrics["n"] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import attnzoo
    from attnzoo.tasks import get_evaluator

    torch.manual_seed(0)
    pipe = attnzoo.pipeline("image-classification", model=args.model, weights="none", device=args.device)
    model = pipe.model
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_imagenet_folder(root, args.images)
        evaluator = get_evaluator("image-classification")(root)
        samples = evaluator.dataset.samples
        # warm-up both paths (first-touch allocations, worker start-up code paths, file cache)
        baseline(model, samples[: args.batch_size * 2], pipe.transform, args.batch_size, args.workers)
        ours(
            pipe,
            get_evaluator("image-classification")(root, limit=args.batch_size * 2),
            root / "warm",
            args.batch_size,
            args.workers,
        )
        base_runs, our_runs = [], []
        for _ in range(args.repeats):  # interleaved so drift affects both equally
            base_runs.append(baseline(model, samples, pipe.transform, args.batch_size, args.workers))
            our_runs.append(ours(pipe, evaluator, root / "out", args.batch_size, args.workers))
    b, o = statistics.median(base_runs), statistics.median(our_runs)
    print(
        f"model={args.model} images={args.images} batch={args.batch_size} workers={args.workers} device={args.device} "
        f"torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    print(f"baseline DataLoader loop: {b:8.1f} img/s  (runs: {', '.join(f'{x:.1f}' for x in base_runs)})")
    print(f"attnzoo evaluate():       {o:8.1f} img/s  (runs: {', '.join(f'{x:.1f}' for x in our_runs)})")
    print(f"ratio ours/baseline: {o / b:.3f}x  (goal >= 0.95x)")


if __name__ == "__main__":
    main()
