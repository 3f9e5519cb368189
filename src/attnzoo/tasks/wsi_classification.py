"""The whole-slide classification task: ACMIL and ABMIL on patch features."""

from attnzoo.tasks import TaskSpec, register_task

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
    )
)
