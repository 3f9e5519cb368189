"""The whole-slide classification task: ACMIL and ABMIL on patch features."""

from attnzoo.tasks import Option, TaskSpec, register_task

SPEC = register_task(
    TaskSpec(
        "wsi-classification",
        "class probabilities, per-patch attention and a heatmap for a whole-slide image or its patch features (ACMIL, ABMIL)",
        pipelines=("attnzoo.pipelines.wsi_classification:WSIClassificationPipeline",),
        default_model="acmil_ga",
        aliases=("slide-classification", "mil"),
        evaluator="attnzoo.evaluation.wsi:WSIClassificationEvaluator",
        recipe="attnzoo.training.wsi:train_wsi_classification",
        inputs="files",
        inputs_help="Input files: slides or patch-feature files (.h5).",
        data_help="Patch features: an ACMIL/CLAM/TRIDENT/attnzoo .h5 file or folder, with labels (labels.csv or the file's own).",
        docs="wsi-classification.md",
        # A slide's settings for `attnzoo run` (the pipeline's; ignored for feature files). CLAM's tissue
        # segmentation settings are Python's segment_kwargs, or --segment of `attnzoo extract wsi-features`.
        options=(
            Option(
                "encoder", str, "Slides: the patch encoder, resnet18 (ACMIL), resnet50_trunc (CLAM) or a timm name."
            ),
            Option(
                "encoder_weights", str, "Slides: the encoder's weights: pretrained, none (random), or a path or URL."
            ),
            Option("magnification", float, "Slides: the magnification patches are cut at (default 20)."),
            Option("mpp", float, "Slides: µm per pixel instead of --magnification."),
            Option("patch_size", int, "Slides: patch side in pixels at that resolution (default 256)."),
            Option("input_size", int, "Slides: the side patches are resized to for the encoder (default 224)."),
            Option(
                "read_level",
                str,
                "Slides: base (read level 0 and resize, as CLAM and ACMIL; the default) or auto (coarsest level "
                "fine enough).",
            ),
            Option("min_tissue", float, "Slides: the fraction of a patch that must be tissue (default 0.5)."),
            Option("base_magnification", float, "Slides: the scan's objective, for a file without it (plain TIFF)."),
            Option("base_mpp", float, "Slides: the scan's µm per pixel, for a file without it."),
        ),
    )
)
