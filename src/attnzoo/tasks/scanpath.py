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
            # NevaClip's search, for run and eval (the paper's settings by default: 10 x 20 take minutes per
            # image on a CPU)
            Option("fixations", int, "NevaClip: fixations per scanpath (default 10, the paper's).", ("run", "eval")),
            Option(
                "iterations",
                int,
                "NevaClip: gradient steps searching each fixation (default 20; fewer is faster and rougher).",
                ("run", "eval"),
            ),
            Option("lr", float, "NevaClip: sign-gradient step in [-1, 1] crop units (default 0.1).", ("run", "eval")),
            Option(
                "random_restarts",
                bool,
                "NevaClip: restart a fixation that did not improve at a random place (the default, as the paper); "
                "--no-random-restarts jitters it instead.",
                ("run", "eval"),
            ),
            Option(
                "forgetting",
                float,
                "NevaClip: share of the earlier fixations kept sharp at each step, in [0, 1] (default 0: only the last).",
                ("run", "eval"),
            ),
            Option(
                "truncate",
                bool,
                "NevaClip: cut captions longer than CLIP's 77 tokens instead of refusing them.",
                ("run",),
            ),
            Option(
                "boxes",
                str,
                "OAT: the display's object boxes, a .json or .npy file of [N, 4] (x0, y0, x1, y1) pixels (any order).",
                ("run",),
            ),
            Option("target", int, "OAT: the object searched for, as its index (0-based) in --boxes.", ("run",)),
            Option(
                "max_len",
                int,
                "OAT: at most this many fixations (default: the training run's longest scanpath, else one per object).",
                ("run",),
            ),
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
                "initial_fixation",
                bool,
                "On mit1003: keep each scanpath's first, central fixation (pysaliency's "
                "get_mit1003_with_initial_fixation); by default it is dropped, as get_mit1003 does.",
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
