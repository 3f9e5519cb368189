"""The subject-insertion task: In-Context Brush (and Diptych Prompting's edit) on FLUX.1-Fill."""

from attnzoo.tasks import Option, TaskSpec, register_task

_RUN_EVAL = ("run", "eval")

SPEC = register_task(
    TaskSpec(
        "subject-insertion",
        "put a subject from one photo into a masked region of another: In-Context Brush on FLUX.1-Fill "
        "(or Diptych Prompting's attention edit, or plain FLUX Fill)",
        pipelines=("attnzoo.pipelines.subject_insertion:SubjectInsertionPipeline",),
        default_model="flux_fill",
        aliases=("insertion", "in-context-brush"),
        evaluator="attnzoo.evaluation.subject_insertion:SubjectInsertionEvaluator",
        inputs="files",
        inputs_help="The target images to insert the subject into (or give one with --target).",
        options=(
            Option("target", str, "The target image (or give it as the positional input).", ("run",)),
            Option("subject", str, "The subject's photo (an RGBA photo's alpha is its mask).", ("run",)),
            Option(
                "mask", str, "Where to insert into the target: a mask image (white = fill) or a VIA .json.", ("run",)
            ),
            Option("prompt", str, "A short caption of the result, e.g. 'A barn in the snow'.", ("run",)),
            Option("subject_mask", str, "The subject's mask image (white = subject).", ("run",)),
            Option(
                "subject_word",
                str,
                "Segment the subject by this word (Grounding DINO + SAM, downloaded on first use).",
                ("run",),
            ),
            Option("method", str, "in-context-brush (default), diptych or none (plain FLUX Fill).", _RUN_EVAL),
            Option(
                "behaviour",
                str,
                "corrected (default: real latent blending, text length from the inputs, upright VIA masks) or "
                "official (the released code's behaviour).",
                _RUN_EVAL,
            ),
            Option("steps", int, "Denoising steps (default 50).", _RUN_EVAL),
            Option("guidance", float, "FLUX guidance scale (default 30, FLUX.1-Fill's).", _RUN_EVAL),
            Option("seed", int, "Seed of the noise (default 0).", ("run",)),
            Option("seeds", str, "Seeds per subject/background pair, comma-separated (default 0,1,2,3).", ("eval",)),
            Option("panel_size", str, "Panel size in pixels: 768 (default) or HxW.", _RUN_EVAL),
            Option("orientation", str, "vertical (default) or horizontal (Diptych's default) diptych.", _RUN_EVAL),
            Option("blend", str, "on/off: latent blending outside the mask (default: on when corrected).", _RUN_EVAL),
            Option(
                "shift_img", float, "In-Context Brush: shift towards the subject's tokens (default 0.3).", _RUN_EVAL
            ),
            Option("shift_txt", float, "In-Context Brush: shift towards the text tokens (default 0.3).", _RUN_EVAL),
            Option("head_gain", float, "In-Context Brush: head reweighting gain (default 0.2; 0 = off).", _RUN_EVAL),
            Option("enforce", float, "Diptych: lambda of the reference attention (default 1.3).", _RUN_EVAL),
            Option("blocks", str, "Edit only these blocks, e.g. 0-18 (forward order; default all).", _RUN_EVAL),
            Option("step_window", str, "Edit only these steps: start,stop (ints, or fractions 0,0.5).", _RUN_EVAL),
            Option(
                "cpu_offload", bool, "Keep each model on the CPU until it runs (needs accelerate and a GPU).", _RUN_EVAL
            ),
            Option("manifest", str, "The insertion manifest (default: insertion.json in --data).", ("eval",)),
            Option("clip_model", str, "open_clip model for CLIP-I/CLIP-T (default ViT-B-32:openai).", ("eval",)),
            Option("dino_model", str, "timm model for DINO (default vit_small_patch16_224.dino).", ("eval",)),
        ),
        data_help="A DreamBooth/DreamBench folder (dataset/<subject>/*.jpg) with an insertion.json manifest of "
        "backgrounds and masks; see docs/subject-insertion.md.",
        docs="subject-insertion.md",
    )
)
