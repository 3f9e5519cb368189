"""The hallucination-mitigation task: LVLM answers with VAR, PAI, PAINT, VCD, AGLA or CARVE (or a
combination), and the POPE / CHAIR / MME benchmarks."""

from attnzoo.tasks import Option, TaskSpec, register_task

_RUN = ("run",)
_EVAL = ("eval",)
_BOTH = ("run", "eval")

#: The methods' own settings on the command line (each goes to the methods that take it).
_METHOD_OPTIONS = (
    Option("behaviour", str, "official (default: the released code's behaviour) or paper (the paper's method).", _BOTH),
    Option("alpha", float, "PAI 0.2 / PAINT 0.7: attention boost; VCD 1 / AGLA 2: contrast strength.", _BOTH),
    Option("beta", float, "PAINT: summary-token boost (0.3); VCD 0.2 / AGLA 0.5: plausibility cutoff.", _BOTH),
    Option(
        "batched",
        bool,
        "VCD / AGLA paper: the contrast branch as rows of the main forward (default) or its own forward (--no-batched).",
        _BOTH,
    ),
    Option("gamma", float, "PAI 1.1 / PAINT 2: classifier-free guidance strength (1 = off).", _BOTH),
    Option("tau", float, "VAR: sink threshold on the sink dimensions (20).", _BOTH),
    Option("rho", float, "VAR: minimum visual non-sink ratio of an image-centric head, paper's rho (0.5).", _BOTH),
    Option("p", float, "VAR: share of the sink attention moved to the image, paper's p (0.4).", _BOTH),
    Option("summ", float, "VAR: minimum image attention of an image-centric head (0.2).", _BOTH),
    Option("sink_dims", str, "VAR: the backbone's sink dimensions, e.g. 1415,2533 (known for LLaMA-2 7B/13B).", _BOTH),
    Option("noise_step", int, "VCD: diffusion noise step of the contrast image (500 of 1000).", _BOTH),
    Option("top_percent", float, "CARVE: share of the fused map kept before choosing regions (0.2).", _BOTH),
    Option("variant", str, "CARVE: fusion variant v1-v4 (v4: every probe step, weight t+1).", _BOTH),
    Option(
        "layers",
        str,
        "CARVE: the language-model layers its probes read (20-25, or 20,21,...,25); 1-3 on a small model.",
        _BOTH,
    ),
    Option("probe_tokens", int, "CARVE: greedy tokens per probe (32).", _BOTH),
    Option(
        "blip_model",
        str,
        "AGLA: its BLIP image-text-matching model, a Hub id or a local folder (Salesforce/blip-itm-large-coco).",
        _BOTH,
    ),
)

SPEC = register_task(
    TaskSpec(
        "hallucination-mitigation",
        "answer questions about images with an LVLM and a training-free hallucination-mitigation method: VAR, "
        "PAI, PAINT, VCD, AGLA, CARVE or a combination (var+agla); POPE, CHAIR and MME benchmarks",
        pipelines=("attnzoo.pipelines.hallucination_mitigation:HallucinationMitigationPipeline",),
        default_model="llava-hf/llava-1.5-7b-hf",
        aliases=("hallucination", "lvlm-hallucination"),
        evaluator="attnzoo.evaluation.hallucination:HallucinationEvaluator",
        eval_split="POPE adversarial, CHAIR val2014, MME perception",
        options=(
            Option("question", str, "The question to ask about every image.", _RUN),
            Option(
                "method", str, "none (default), var, pai, paint, vcd, agla, carve, or a combination: var+agla.", _BOTH
            ),
            Option("methods", str, "Compare methods on the same samples: none,var,agla (one table).", _EVAL),
            Option("benchmark", str, "pope (default), chair or mme.", _EVAL),
            Option("source", str, "POPE source: coco (default), aokvqa or gqa.", _EVAL),
            Option("questions", str, "POPE: a question file to use instead of the published one.", _EVAL),
            Option("image_folder", str, "POPE: the images' folder (default: found under --data).", _EVAL),
            Option("parser", str, "Answer parser: POPE pope/opera/vcd/strict, MME mme/lmms-eval/strict.", _EVAL),
            Option("prompt", str, "CHAIR: the captioning prompt (default OPERA's).", _EVAL),
            Option("prompt_suffix", str, "POPE/MME: one-word, llava, yes-no, none, released (MME) or literal.", _EVAL),
            Option("image_list", str, "CHAIR: a list of images (AGLA's chair.jsonl, a caption log).", _EVAL),
            Option("chair_images", int, "CHAIR: images sampled with --seed when no list is given (500).", _EVAL),
            Option("lemmatizer", str, "CHAIR: nltk (default, the scorer's) or builtin.", _EVAL),
            Option("subtasks", str, "MME: subtasks (default existence,count,position,color).", _EVAL),
            Option(
                "max_new_tokens",
                int,
                "Answer length limit (run 128; POPE/MME 64, CHAIR 512); prompt + answer fit the model's context.",
                _BOTH,
            ),
            Option("do_sample", bool, "Sampled decoding (default: greedy).", _BOTH),
            Option("temperature", float, "Sampling temperature (1).", _BOTH),
            Option("top_p", float, "Sampling top-p (1).", _BOTH),
            Option("top_k", int, "Sampling top-k (none).", _BOTH),
            Option(
                "num_beams",
                int,
                "Beam search (1; at most the vocabulary; attention edits and CARVE, not contrast branches).",
                _BOTH,
            ),
            Option("seed", int, "Sampling seed (0; eval: each sample's seed derives from it).", _BOTH),
            Option(
                "chat_template",
                str,
                "model (the processor's, default), llava_v1, or a literal with {question} and, once, {image}.",
                _BOTH,
            ),
            Option(
                "attn_implementation", str, "The language model's attention: eager, sdpa, ... (the model's).", _BOTH
            ),
            Option("revision", str, "The Hub revision (commit) of the model.", _BOTH),
            Option("return_attention", bool, "Picture the answer's attention over the image, with/without.", _RUN),
            *_METHOD_OPTIONS,
        ),
        data_help="POPE: AGLA's or VCD's data/ folder; CHAIR: COCO 2014 (annotations/, val2014/); MME: "
        "MME_Benchmark_release_version/. See docs/hallucination-benchmarks.md.",
        docs="hallucination-mitigation.md",
    )
)
