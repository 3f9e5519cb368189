"""The scanpath task: NevaClip (zero-shot, CLIP) and OAT (visual search), each with its pipeline."""

from attnzoo.tasks import Option, TaskSpec, register_task

SPEC = register_task(
    TaskSpec(
        "scanpath",
        "fixations (x, y) where people will look: NevaClip (zero-shot, an image + a caption) or OAT (visual search on a shelf)",
        pipelines=(
            "attnzoo.pipelines.scanpath:NevaClipScanpathPipeline",
            "attnzoo.pipelines.scanpath:OATScanpathPipeline",
        ),
        default_model="nevaclip",
        aliases=("scanpath-prediction", "gaze"),
        evaluator="attnzoo.evaluation.scanpath:ScanpathEvaluator",
        recipe="attnzoo.training.scanpath:train_scanpath",
        train_model="oat",
        options=(
            Option("caption", str, "NevaClip: what the viewer looks for, e.g. 'a man crossing the street'.", ("run",)),
            Option(
                "dataset",
                str,
                "capmit1003, mit1003, amazon, yogurt or wine (default: detected from --data).",
                ("eval",),
            ),
            Option(
                "captions",
                str,
                "On capmit1003: own, misleading, other-subject, comma-separated (default own,misleading).",
                ("eval",),
            ),
            Option(
                "seed",
                int,
                "Seed of NevaClip's restarts, misleading captions and OAT's split (default 0; for an OAT "
                "training run's weights, its split seed).",
                ("run", "eval"),
            ),
            Option(
                "samples",
                int,
                "OAT: sampled scanpaths per trial (the paper's 'multi' rows use 100) instead of greedy decoding.",
                ("eval",),
            ),
        ),
        data_help="A scanpath dataset folder: CapMIT1003, MIT1003, or an OAT visual-search set (amazon, yogurt, wine).",
        docs="scanpath.md",
    )
)
