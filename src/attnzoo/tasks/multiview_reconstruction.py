"""The multi-view 3D reconstruction task: LRGT."""

from attnzoo.tasks import Option, TaskSpec, register_task

SPEC = register_task(
    TaskSpec(
        "multiview-3d-reconstruction",
        "a 32^3 occupancy grid (mesh, .obj/.ply/.binvox) from any number of images of one object, with LRGT",
        pipelines=("attnzoo.pipelines.multiview_reconstruction:MultiViewReconstructionPipeline",),
        default_model="lrgt",
        aliases=("3d-reconstruction", "multiview-reconstruction"),
        evaluator="attnzoo.evaluation.reconstruction:MultiViewReconstructionEvaluator",
        recipe="attnzoo.training.reconstruction:train_reconstruction",
        inputs="folders",
        options=(
            Option("threshold", float, "Occupancy threshold of the voxels (default 0.3, the official one).", ("run",)),
            Option("views", str, "View counts to sweep, e.g. 1,2,3,4,5,8,12,16,20 (default 3).", ("eval",)),
            Option("fscore", bool, "Also F-score@1% (slower).", ("eval",), False),
        ),
        data_help="ShapeNet-R2N2 root (ShapeNetRendering/, ShapeNetVox32/ and the split file).",
        docs="multiview-3d-reconstruction.md",
    )
)
