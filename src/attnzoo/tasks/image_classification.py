"""The image-classification task: any timm classifier, attnzoo's included."""

from attnzoo.tasks import Option, TaskSpec, register_task

SPEC = register_task(
    TaskSpec(
        "image-classification",
        "top-k ImageNet (or your own) classes for images, with any timm or attnzoo classifier",
        pipelines=("attnzoo.pipelines.image_classification:ImageClassificationPipeline",),
        default_model="resnet50.a1_in1k",
        aliases=("classification", "image-classifier"),
        evaluator="attnzoo.evaluation.classification:ClassificationEvaluator",
        recipe="attnzoo.training.classification:train_classification",
        eval_split="val",
        options=(Option("top_k", int, "Classes to report per image.", ("run",), 5),),
        data_help="Dataset root: ImageNet (either published layout) or class folders, with train/ and val/ splits.",
        docs="image-classification.md",
    )
)
