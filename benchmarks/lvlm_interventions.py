"""Per-token decode time of each LVLM hallucination-mitigation method against plain ``generate`` on
the same model, measured alternately in the same run.

Decode time per token = the median gap between consecutive decoding steps of one ``generate`` (a
logits processor stamps each step), so the prefill and the vision tower stay out. VCD and AGLA's
paper behaviour run batched by default (``vcd``, ``agla-paper``: the branch prompt is a second row of
the main ``generate``, one batched forward per token); the ``-separate`` rows run the branch as a
second forward per token with its own cache (``batched=False``), AGLA's official behaviour only at
the first token. CARVE is a pre-pass, so its row is the time of one whole answer (both probes, the
refinement and the final pass on [original, refined], which on LLaVA continues from the probes'
image-prefix cache) over one plain answer of the same length on the same prompt; ``carve-6q`` asks
six POPE-style questions about one image as one batch (one general probe and one image prefix
serve all six), against the six plain answers batched. On the CPU the
stamps are the process's CPU time (``time.process_time``), which other jobs on a shared machine do
not inflate; on a GPU they are wall time after a synchronize. Each method is
timed right after a plain run, and the ratio is the median over the repeats of those pairs. The default model is a
tiny random LLaVA-1.5 with the real layout (336 px CLIP, 576 image tokens) and a small language
model; ``--text-shape llava-7b`` gives its language model LLaVA-1.5-7B's layer shape (``--layers`` of
them: 2 on a CPU, 32 for the whole 7B on a GPU, built there in ``--dtype``), where the attention over a
long prompt weighs against the weights as in the real model (on the tiny shape it weighs about 16x
more: CARVE's official final pass holds two images); ``--model`` loads a real checkpoint through
transformers' ``from_pretrained`` (cache, offline mode) for GPU runs.

    python benchmarks/lvlm_interventions.py                                   # CPU, tiny model
    python benchmarks/lvlm_interventions.py --methods var,pai --tokens 32
    python benchmarks/lvlm_interventions.py --methods carve,carve-paper --text-shape llava-7b --layers 2
    python benchmarks/lvlm_interventions.py --text-shape llava-7b --layers 32 --device cuda --dtype bfloat16
    python benchmarks/lvlm_interventions.py --model llava-hf/llava-1.5-7b-hf --device cuda --dtype float16

To add a method, append a :class:`Method` to ``METHODS``: ``setup(model, inputs)`` returns the context
manager that attaches it and the extra ``generate`` keyword arguments (e.g. ``logits_processor``, or
``inputs`` to run on other model inputs, as the paired rows of a batched contrast branch); or
``answer(model, batch)`` returns the prompt batch a pre-pass method answers on (timed whole).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

# This folder's kernels.py would shadow Hugging Face's `kernels` package, which transformers imports.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
from transformers import LogitsProcessorList  # noqa: E402

from attnzoo.errors import InvalidOptionError  # noqa: E402
from attnzoo.kernels import use_backend  # noqa: E402
from attnzoo.multimodal.hallucination import CARVE, PAI, PAINT, VAR, VCD, AGLALogitsProcessor  # noqa: E402
from attnzoo.multimodal.hallucination.base import PairedContrast, family_for  # noqa: E402
from attnzoo.multimodal.hallucination.functional import CARVE_LAYERS  # noqa: E402
from attnzoo.multimodal.hallucination.kv_cache import reserved_cache  # noqa: E402
from attnzoo.multimodal.hallucination.method import CachedPrefix, PromptBatch  # noqa: E402
from attnzoo.multimodal.hallucination.var import sink_dims_for  # noqa: E402


@dataclass
class Method:
    name: str
    goal: float | None
    setup: Callable[[torch.nn.Module, dict], tuple[contextlib.AbstractContextManager, dict]] | None = None
    note: str = ""
    answer: Callable[[torch.nn.Module, PromptBatch], PromptBatch] | None = None
    #: questions about the one image, asked as one batch (pre-pass methods)
    questions: int = 1


@contextlib.contextmanager
def _eager_text(model):
    """The language model on transformers' own eager attention (what the methods compute on)."""
    key = "text_config" if "text_config" in model.config.sub_configs else ""
    before = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation({key: "eager"} if key else "eager")
    try:
        yield
    finally:
        model.set_attn_implementation({key: before} if key else before)


def _attention_edit(make):
    return lambda model, inputs: (make(model).attach(model), {})


def _pai_cfg(model, inputs):
    pai = PAI().attach(model)
    return pai, {"logits_processor": LogitsProcessorList([pai.cfg_processor(inputs, gamma=1.1)])}


def _var(model):
    # VAR's default sink layers are 2 to L - 1: a model of fewer layers (--layers 1) is edited on all of them
    depth = model.config.get_text_config().num_hidden_layers
    layers = {} if depth > 2 else {"sink_layers": range(depth)}
    try:
        sink_dims_for(model)
        return VAR(**layers)
    except InvalidOptionError:
        # A random model has no massive activations: a low tau makes ~2% of the tokens sinks (real
        # LLaVA has a handful), so the redistribution path runs instead of VAR's no-sink shortcut.
        return VAR(sink_dims=(0, 1), tau=2.3, summ=0.0, **layers)


@contextlib.contextmanager
def _torch_backend(intervention):
    """The intervention with attnzoo's kernels on their torch backend: VAR's decoding steps on its eager
    path, where on a GPU they would run the fused kernel."""
    with use_backend("torch"), intervention:
        yield


def _processors(make):
    return lambda model, inputs: (
        contextlib.nullcontext(),
        {"logits_processor": LogitsProcessorList(make(model, inputs))},
    )


def _vcd(model, inputs):
    return VCD().processor(model, PromptBatch([], [], inputs, encode=None))


def _agla(behaviour):
    """AGLA's assembly processor; the augmented view is the image with its right fifth blacked out (the
    decode cost does not depend on which pixels BLIP's GradCAM keeps, and no BLIP model is loaded)."""

    def make(model, inputs):
        pixels = inputs["pixel_values"].clone()
        pixels[..., -pixels.shape[-1] // 5 :] = pixels.min()
        return AGLALogitsProcessor(model, {**inputs, "pixel_values": pixels}, behaviour=behaviour)

    return make


def _separate(make):
    """The contrast processor with its branch as a second forward per token (``batched=False``)."""
    return _processors(lambda model, inputs: [make(model, inputs)])


def _paired(make):
    """The contrast branch as the second row of the main generate (``batched=True``): the pipeline's way."""

    def setup(model, inputs):
        paired = PairedContrast(make(model, inputs))
        return paired.attached(), {"logits_processor": [paired], "inputs": paired.inputs(inputs)}

    return setup


def _carve(behaviour):
    def answer(model, batch):
        depth = model.config.get_text_config().num_hidden_layers
        layers = CARVE_LAYERS if depth > max(CARVE_LAYERS) else tuple(range(max(0, depth - 6), depth))
        carve = CARVE(layers=layers, probe_tokens=batch.extra["tokens"], behaviour=behaviour)
        return carve.prepare(model, None, batch)

    return answer


def _plain_in_place(model, batch):
    """The plain answer decoding on the in-place KV cache CARVE's passes use: how much of CARVE's ratio
    that cache buys (the ratio against stock ``generate`` is the row's, against this row's plain
    answer the quotient of the two rows)."""
    family = family_for(model)
    return replace(batch, cached=CachedPrefix(batch.inputs, reserved_cache(family.text_config())))


METHODS = [
    Method("eager", None, lambda model, inputs: (_eager_text(model), {}), "plain, language model on eager attention"),
    Method("var", 1.1, _attention_edit(_var), "sink detection at prefill, redistribution on every decode row"),
    Method(
        "var-eager",
        None,
        lambda model, inputs: (_torch_backend(_var(model).attach(model)), {}),
        "VAR on its eager path (torch backend; the 'var' row runs the fused decode kernel on a GPU)",
    ),
    Method("pai", 1.1, _attention_edit(lambda m: PAI())),
    Method("paint", None, _attention_edit(lambda m: PAINT())),
    Method("pai+cfg", None, _pai_cfg, "a second (text-only) forward per token"),
    Method("vcd", 1.7, _paired(_vcd), "batched: the noised-image row in the same forward"),
    Method("vcd-separate", None, _separate(_vcd), "batched=False: a second (noised-image) forward per token"),
    Method("agla", 1.7, _separate(_agla("official")), "official: the augmented branch at the first token only"),
    Method("agla-paper", 1.7, _paired(_agla("paper")), "paper, batched: the augmented row in the same forward"),
    Method("agla-paper-separate", None, _separate(_agla("paper")), "paper, batched=False: a second forward per token"),
    Method(
        "carve",
        2.5,
        note="whole answer: 2 probes (one batch), refine, answer on [original, refined]",
        answer=_carve("official"),
    ),
    Method("carve-paper", 2.5, note="whole answer: the same, answer on the refined image", answer=_carve("paper")),
    Method("plain-inplace", None, note="whole answer: plain, on CARVE's in-place KV cache", answer=_plain_in_place),
    Method(
        "carve-6q",
        None,
        note="6 POPE-style questions about one image in one batch, against the 6 plain answers batched",
        answer=_carve("official"),
        questions=6,
    ),
]


#: Language-model layer shapes of the random LLaVA-1.5 (``--text-shape``): ``tiny`` is ``--text-hidden``
#: wide with 4 heads and an MLP twice as wide; ``llava-7b`` is one layer of LLaVA-1.5-7B's Vicuna
#: (hidden 4096, 32 heads, MLP 11008), so attention weighs against the weights as in the 7B model.
TEXT_SHAPES = {"llava-7b": {"text_hidden": 4096, "text_heads": 32, "kv_heads": 32, "text_intermediate": 11008}}


def tiny_llava(text_hidden: int, layers: int, shape: str = "tiny", device=None, dtype=None):
    """A random LLaVA-1.5 with the real image layout (336 px / 14 px CLIP: 576 image tokens), built on
    ``device`` in ``dtype``."""
    from tests.lvlm_helpers import tiny_llava as build

    text = TEXT_SHAPES.get(shape, {"text_hidden": text_hidden})
    return build(
        batch=1, layers=layers, image_size=336, text_before=[30], text_after=[20], device=device, dtype=dtype, **text
    )


def describe_model(args) -> str:
    if args.model:
        return args.model
    if args.text_shape == "tiny":
        return f"tiny LLaVA-1.5 (text hidden {args.text_hidden}, {args.layers} layers)"
    shape = TEXT_SHAPES[args.text_shape]
    return (
        f"random LLaVA-1.5, {args.text_shape} layer shape (text hidden {shape['text_hidden']}, "
        f"{shape['text_heads']} heads, MLP {shape['text_intermediate']}, {args.layers} layers)"
    )


def load(name: str, device, dtype):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(name)
    from PIL import Image

    image = Image.new("RGB", (336, 336), (120, 90, 60))
    prompt = "USER: <image>\nDescribe the image in detail. ASSISTANT:"
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return model, dict(inputs), _llava_hf_encoder(processor, device, dtype)


def _llava_hf_encoder(processor, device, dtype):
    """A llava-hf prompt per question, one <image> per image (CARVE's final pass has two), left-padded."""
    processor.tokenizer.padding_side = "left"

    def encode(images, questions):
        groups = [[image] if not isinstance(image, list) else image for image in images]
        prompts = [f"USER: {'<image>' * len(g)}\n{q} ASSISTANT:" for g, q in zip(groups, questions, strict=True)]
        flat = [image for group in groups for image in group]
        inputs = processor(images=flat, text=prompts, padding=True, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return dict(inputs)

    return encode


def _tiny_encoder(device, dtype):
    from tests.multimodal.lvlm_prompts import llava_encoder

    encode = llava_encoder(336)

    def on_device(images, questions):
        inputs = encode(images, questions)
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}

    return on_device


POPE_OBJECTS = ("dog", "car", "person", "chair", "bottle", "cup")


def prompt_batch(encode, tokens: int, questions: int = 1) -> PromptBatch:
    """One photograph-sized random image and a question (or ``questions`` POPE-style ones about it),
    as the pipeline would hand them over."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    asked = ["Describe the image in detail. What is in the top left corner of the picture, and what color is it?"]
    if questions > 1:
        asked = [f"Is there a {POPE_OBJECTS[i % len(POPE_OBJECTS)]} in the image?" for i in range(questions)]
    images = [image] * len(asked)
    return PromptBatch(images, asked, encode(images, asked), encode, extra={"tokens": tokens})


class StepClock:
    """A logits processor that stamps each decoding step; the gaps between stamps are the per-token
    decode times (one forward plus generate's bookkeeping and the processors before it)."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
        else:  # CPU time of this process: robust to other jobs sharing the cores
            self.stamps.append(time.process_time())
        return scores


def _clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def whole_answer(model, batch: PromptBatch, tokens: int, answer, device) -> float:
    """Seconds for one answer of ``tokens`` tokens, the method's pre-pass included."""
    start = _clock(device)
    with torch.no_grad():
        final = answer(model, batch) if answer else batch
        inputs = final.generate_inputs()  # CARVE's official final pass continues from its probes' image prefix
        model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return _clock(device) - start


def per_token(model, inputs, tokens: int, setup, device) -> float:
    """Median decode seconds per token, the method attached afresh (as a user would)."""
    context, extra = setup(model, inputs) if setup else (contextlib.nullcontext(), {})
    clock = StepClock(device)
    extra = dict(extra)
    inputs = extra.pop("inputs", inputs)
    extra["logits_processor"] = LogitsProcessorList([*extra.get("logits_processor", []), clock])
    with context, torch.no_grad():
        model.generate(**inputs, **extra, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    gaps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return statistics.median(gaps)


def interleaved(model, inputs, tokens: int, setup, device) -> float | None:
    """The method's decoding steps against stock steps of the same ``generate``: the language model's
    attention implementation alternates, step by step, between the method's and the stock one (its
    prefill runs the method). Both kinds of step share the run's memory state, so this ratio is
    steadier than the run pairs' on a shared machine; it exists only for methods that act through
    the attention implementation (eager, the attention edits), None for the others."""
    config = model.config.get_text_config()
    stock = config._attn_implementation_internal
    context, extra = setup(model, inputs)
    with context:
        ours = config._attn_implementation_internal
        if extra or ours == stock:
            return None
        stamps: list[float] = []

        def alternate(input_ids, scores):
            stamps.append(_clock(device))
            config._attn_implementation_internal = ours if len(stamps) % 2 else stock  # odd: the method next
            return scores

        try:
            with torch.no_grad():
                model.generate(
                    **inputs,
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                    do_sample=False,
                    pad_token_id=0,
                    logits_processor=LogitsProcessorList([alternate]),
                )
        finally:
            config._attn_implementation_internal = ours
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(gaps[0::2]) / statistics.median(gaps[1::2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(m.name for m in METHODS))
    p.add_argument("--tokens", type=int, default=24, help="new tokens per timed generate")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--model", default=None, help="a checkpoint for from_pretrained (default: tiny random LLaVA)")
    p.add_argument("--text-hidden", type=int, default=256, help="the tiny shape's width")
    p.add_argument(
        "--text-shape",
        default="tiny",
        choices=["tiny", *TEXT_SHAPES],
        help="the random model's language-model layer shape (llava-7b: LLaVA-1.5-7B's, with --layers of them)",
    )
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="also time the attention methods' decoding steps alternating with stock steps in one generate "
        "(the 'steps' column: steadier than the run pairs on a shared machine)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.model:
        model, inputs, encode = load(args.model, device, dtype)
    else:
        model, inputs = tiny_llava(args.text_hidden, args.layers, args.text_shape, device, dtype)
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        encode = _tiny_encoder(device, dtype)
    batches = {m.questions: prompt_batch(encode, args.tokens, m.questions) for m in METHODS}
    chosen = [m for m in METHODS if m.name in args.methods.split(",")]
    print(
        f"model={describe_model(args)} "
        f"prompt={inputs['input_ids'].shape[1]} tokens device={device} dtype={args.dtype} "
        f"threads={torch.get_num_threads()} new tokens={args.tokens} repeats={args.repeats} "
        f"torch={torch.__version__}" + (f" gpu={torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    )
    for _ in range(2):  # warm-up
        per_token(model, inputs, 4, None, device)
    # Per repeat, each method right after its own plain run: the ratio survives load that drifts
    # between repeats (the machine may be shared); the medians are over the repeats.
    times: dict[str, list[float]] = {"plain": [], **{m.name: [] for m in chosen}}
    ratios: dict[str, list[float]] = {m.name: [] for m in chosen}
    steps: dict[str, list[float]] = {m.name: [] for m in chosen}
    for _ in range(args.repeats):
        for method in chosen:
            if method.answer is not None:
                batch = batches[method.questions]
                plain = whole_answer(model, batch, args.tokens, None, device)
                t = whole_answer(model, batch, args.tokens, method.answer, device)
                times.setdefault("plain answer" if method.questions == 1 else "plain answers", []).append(plain)
            else:
                plain = per_token(model, inputs, args.tokens, None, device)
                t = per_token(model, inputs, args.tokens, method.setup, device)
                times["plain"].append(plain)
                if method.setup is not None and args.interleave:
                    step = interleaved(model, inputs, 2 * args.tokens, method.setup, device)
                    if step is not None:
                        steps[method.name].append(step)
            times[method.name].append(t)
            ratios[method.name].append(t / plain)
    print(
        f"{'method':20s} {'ms':>9s} {'ratio':>7s} {'steps':>7s} {'goal':>6s}   (ms: per token; whole answer for "
        "'answer' rows; steps: the method's steps against stock steps of one generate, --interleave)"
    )
    if times["plain"]:
        print(f"{'plain':20s} {1e3 * statistics.median(times['plain']):9.3f} {1.0:7.3f}")
    for name in ("plain answer", "plain answers"):
        if name in times:
            print(f"{name:20s} {1e3 * statistics.median(times[name]):9.1f} {1.0:7.3f}")
    for method in chosen:
        ratio = statistics.median(ratios[method.name])
        goal = f"<={method.goal}" if method.goal else "-"
        status = "" if method.goal is None else (" ok" if ratio <= method.goal else " MISSED")
        ms = 1e3 * statistics.median(times[method.name])
        step = f"{statistics.median(steps[method.name]):7.3f}" if steps[method.name] else f"{'-':>7s}"
        print(f"{method.name:20s} {ms:9.3f} {ratio:7.3f} {step} {goal:>6s}{status}  {method.note}")


if __name__ == "__main__":
    main()
