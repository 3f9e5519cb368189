"""The LVLMs of the hallucination-mitigation task, registered under their Hugging Face Hub ids
(``create_model("llava-hf/llava-1.5-7b-hf")``, or the short names of :data:`HUB_IDS`).

A 7B model should be read from disk once, straight onto its device in its dtype, and only the
pipeline knows those. So with pretrained weights (the default) the builders return an
:class:`LVLMCheckpoint`, a handle that :class:`~attnzoo.pipelines.hallucination_mitigation.\
HallucinationMitigationPipeline` loads with transformers' own ``AutoModelForImageTextToText`` /
``AutoProcessor.from_pretrained`` (its cache, offline mode, ``dtype``, ``device_map``, ``revision``,
``attn_implementation``); ``LVLMCheckpoint.load()`` does the same by hand. Pipelines that ask for the
same checkpoint with the same loading settings share one loaded model (a ``--methods`` comparison
loads it once). With random weights (``weights="none"``) a builder returns a tiny random LLaVA-1.5
with an offline tokenizer and processor instead (random 7B weights would be 14 GB of noise): it runs
end to end in milliseconds for the demo and the tests, and its answers are gibberish.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from attnzoo._values import nonblank_text
from attnzoo.errors import InvalidOptionError, WeightsError
from attnzoo.registry import register_model

__all__ = [
    "HUB_IDS",
    "TINY_NAMES",
    "LVLMCheckpoint",
    "attach_processor",
    "pretrained_source",
    "processor_for",
    "tiny_llava",
    "tiny_lvlm",
]

#: Registered names -> the Hub id each loads (the families of ``layouts.py``).
HUB_IDS: dict[str, str] = {
    "llava_1_5_7b": "llava-hf/llava-1.5-7b-hf",
    "llava_1_5_13b": "llava-hf/llava-1.5-13b-hf",
    "llava_v1_6_mistral_7b": "llava-hf/llava-v1.6-mistral-7b-hf",
    "llava_v1_6_vicuna_7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava_v1_6_vicuna_13b": "llava-hf/llava-v1.6-vicuna-13b-hf",
    "qwen2_vl_7b_instruct": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2_5_vl_3b_instruct": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2_5_vl_7b_instruct": "Qwen/Qwen2.5-VL-7B-Instruct",
    "instructblip_vicuna_7b": "Salesforce/instructblip-vicuna-7b",
}

_PROCESSORS: weakref.WeakKeyDictionary[torch.nn.Module, Any] = weakref.WeakKeyDictionary()
_LOADED: weakref.WeakValueDictionary[tuple, torch.nn.Module] = weakref.WeakValueDictionary()


def attach_processor(model: torch.nn.Module, processor: Any) -> torch.nn.Module:
    """Remember ``processor`` as ``model``'s (the pipeline finds it with :func:`processor_for`)."""
    _PROCESSORS[model] = processor
    return model


def processor_for(model: torch.nn.Module) -> Any | None:
    """The processor a builder or :meth:`LVLMCheckpoint.load` made with ``model`` (None if none)."""
    return _PROCESSORS.get(model)


def pretrained_source(value: Any, what: str, holds: str) -> str:
    """``value`` as what ``from_pretrained`` takes: a Hub id or a folder. An empty name, or a file (a weights
    file given where a saved model's folder goes), is refused naming ``what`` and what it takes (``holds``:
    the model class such a folder holds); transformers would look a file's path up on the Hub and say that
    huggingface.co cannot be reached."""
    name = nonblank_text(os.fspath(value) if isinstance(value, os.PathLike) else value, what)
    if os.path.isfile(name):
        raise InvalidOptionError(
            f"{what} {name} is a file; it takes a Hub id or a folder holding a saved {holds} (its config.json and "
            "weights, as save_pretrained writes them)"
        )
    return name


@dataclass
class LVLMCheckpoint:
    """A transformers LVLM not loaded yet: a Hub id or a local folder, and how to load it.

    ``load()`` returns ``(model, processor)``; ``to(device=, dtype=)`` and ``eval()`` only record
    placement, so the factory's ``create_model(..., device=, dtype=)`` keeps the handle lazy."""

    name_or_path: str
    revision: str | None = None
    dtype: Any = None
    device: Any = None
    device_map: Any = None
    attn_implementation: str | None = None
    from_pretrained: dict[str, Any] = field(default_factory=dict)
    #: The ``config.model_type`` the registered name stands for ("llava_next"): a folder or Hub id
    #: holding another architecture is refused before its weights are read. None: any.
    model_type: str | None = None
    #: The registered name, for that message.
    model_name: str | None = None

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        at = f"@{self.revision}" if self.revision else ""
        return {"checkpoint": f"{self.name_or_path}{at}"}

    def to(self, device: Any = None, dtype: Any = None) -> LVLMCheckpoint:
        return replace(self, device=device if device is not None else self.device, dtype=dtype or self.dtype)

    def eval(self) -> LVLMCheckpoint:
        return self

    def config(self, **overrides: Any) -> Any:
        """The checkpoint's config (``config.json`` only, no weights), checked to be of :attr:`model_type`:
        what a pipeline reads to refuse settings the model cannot take before its weights load."""
        spec = replace(self, **overrides)
        name = _source(spec)
        from attnzoo.weights import hub

        with hub.pretrained_loading(f"the LVLM {name}", name) as cache_only:
            return _checked_config(spec, name, _loading(spec, cache_only))

    def load(self, **overrides: Any) -> tuple[torch.nn.Module, Any]:
        """``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor.from_pretrained`` (from the
        cache only when offline or the Hub is unreachable); ``overrides`` replace this handle's fields."""
        spec = replace(self, **overrides)
        dtype = spec.dtype if spec.dtype is not None else "auto"
        device = torch.device(spec.device) if spec.device is not None else torch.device("cpu")
        device_map = spec.device_map
        if device_map is None and device.type != "cpu" and _has_accelerate():
            device_map = str(device)  # straight onto the device, no copy in host memory
        extra = tuple(sorted((k, repr(v)) for k, v in spec.from_pretrained.items()))
        key: tuple = (
            spec.name_or_path,
            spec.revision,
            str(dtype),
            str(device),
            str(device_map),
            spec.attn_implementation,
            extra,
        )
        shared = _LOADED.get(key)
        if shared is not None:
            return shared, processor_for(shared)
        model, processor = _from_pretrained(spec, dtype, device_map)
        if device_map is None:
            model = model.to(device)
        model.eval()
        attach_processor(model, processor)
        _LOADED[key] = model
        return model, processor


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _from_pretrained(spec: LVLMCheckpoint, dtype: Any, device_map: Any) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from attnzoo.weights import hub

    name = _source(spec)
    extra = {k: v for k, v in spec.from_pretrained.items() if k != "local_files_only"}
    with hub.pretrained_loading(f"the LVLM {name}", name) as cache_only:
        loading = _loading(spec, cache_only)
        model_kwargs = {**loading, "dtype": dtype, **extra}
        if device_map is not None:
            model_kwargs["device_map"] = device_map
        if spec.attn_implementation is not None:
            model_kwargs["attn_implementation"] = spec.attn_implementation
        if spec.model_type is not None:
            _checked_config(spec, name, loading)
        processor = AutoProcessor.from_pretrained(name, **loading)
        model = AutoModelForImageTextToText.from_pretrained(name, **model_kwargs)
    return model, processor


def _source(spec: LVLMCheckpoint) -> str:
    holds = f"{spec.model_type} model" if spec.model_type else "transformers LVLM"
    return pretrained_source(spec.name_or_path, "the LVLM checkpoint (weights=, --weights)", holds)


def _loading(spec: LVLMCheckpoint, cache_only: bool) -> dict[str, Any]:
    asked_cache_only = bool(spec.from_pretrained.get("local_files_only", False))
    return {"revision": spec.revision, "local_files_only": cache_only or asked_cache_only}


def _checked_config(spec: LVLMCheckpoint, name: str, loading: dict[str, Any]) -> Any:
    """The checkpoint's config. One of another architecture than the registered name would load and run
    under that name (``--model qwen2_vl_7b_instruct --weights <a LLaVA folder>``): refused from its config,
    before the weights are read."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name, **loading)
    found = getattr(config, "model_type", None)
    if spec.model_type is not None and found != spec.model_type:
        names = [n for n, kind in _MODEL_TYPES.items() if kind == found]
        fits = f"a name of its architecture as the model ({', '.join(names)})" if names else "a model of its kind"
        raise WeightsError(
            f"{name} holds a {found!r} checkpoint, but {spec.model_name or 'the model asked for'} is a "
            f"{spec.model_type!r} model: give it as weights with {fits}, or weights of this one"
        )
    return config


#: The tiny random models' names (their ``config._name_or_path``), by family.
TINY_NAMES = {
    "llava": "attnzoo/tiny-random-llava",
    "qwen2_vl": "attnzoo/tiny-random-qwen2-vl",
    "instructblip": "attnzoo/tiny-random-instructblip",
}
TINY_LLAVA_NAME = TINY_NAMES["llava"]
#: The registered names' tiny families (LLaVA-NeXT's ids build the LLaVA-1.5 one).
_TINY_FAMILY = {
    name: "qwen2_vl" if "qwen" in name else "instructblip" if "instructblip" in name else "llava" for name in HUB_IDS
}


def tiny_lvlm(family: str = "llava", seed: int = 0) -> torch.nn.Module:
    """A tiny random LVLM of ``family`` ("llava", "qwen2_vl", "instructblip") with its processor
    attached (:func:`processor_for`): a 4-layer LLaMA / Qwen2 language model, a 2-layer vision tower, a
    character-level tokenizer and the family's prompt template, all built offline. For the demo and the
    tests: its answers are gibberish."""
    builders = {"llava": _tiny_llava_parts, "qwen2_vl": _tiny_qwen2_vl_parts, "instructblip": _tiny_instructblip_parts}
    if family not in builders:
        raise InvalidOptionError(f"tiny LVLM families are {', '.join(builders)}, got {family!r}")
    build, processor = builders[family]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build().eval()
    tokenizer = processor.tokenizer
    model.config._name_or_path = TINY_NAMES[family]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return attach_processor(model, processor)


def tiny_llava(seed: int = 0) -> torch.nn.Module:
    """The tiny random LLaVA-1.5: an 84 px CLIP tower with 14 px patches (a 6x6 grid of image tokens)."""
    return tiny_lvlm("llava", seed)


def _text_config(tokenizer: Any, hidden: int = 64, **extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **extra,
    }


_VISION: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def _tiny_llava_parts() -> tuple[Any, Any]:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    side = 84
    tokenizer = _char_tokenizer(["<image>"])
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_HF_TEMPLATE,
    )
    config = LlavaConfig(
        text_config=LlamaConfig(**_text_config(tokenizer)),
        vision_config=CLIPVisionConfig(**_VISION, image_size=side, patch_size=14),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(side // 14) ** 2,
    )
    return lambda: LlavaForConditionalGeneration(config), processor


def _tiny_qwen2_vl_parts() -> tuple[Any, Any]:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    markers = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = _char_tokenizer(markers)
    ids = {m: tokenizer.convert_tokens_to_ids(m) for m in markers}
    pixels = 112 * 112  # every image resized to about 8x8 patches of 14 px: about 4x4 image tokens
    grid = {"min_pixels": pixels, "max_pixels": pixels, "patch_size": 14, "merge_size": 2}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**grid),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**grid),
        chat_template=_QWEN_TEMPLATE,
    )
    config = Qwen2VLConfig(
        text_config=_text_config(
            tokenizer,
            hidden=32,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
        ),
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return lambda: Qwen2VLForConditionalGeneration(config), processor


def _tiny_instructblip_parts() -> tuple[Any, Any]:
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
        LlamaConfig,
    )

    tokenizer, qformer_tokenizer = _char_tokenizer([]), _char_tokenizer([])  # the processor adds <image>
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 28, "width": 28}),
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=4,
    )
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(**_VISION, image_size=28, patch_size=14).to_dict(),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=len(qformer_tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            encoder_hidden_size=32,
        ).to_dict(),
        text_config=LlamaConfig(**_text_config(tokenizer, hidden=32)).to_dict(),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    return lambda: InstructBlipForConditionalGeneration(config), processor


#: The llava-hf prompt layout ("USER: <image>\n{question} ASSISTANT:"), written as a chat template.
_LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }} {% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
#: Qwen2-VL-Instruct's layout: a system turn, then the user's images and text.
_QWEN_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _char_tokenizer(specials: list[str]) -> Any:
    """A tokenizer with one token per printable ASCII character (nothing to download; other characters
    read as ``<unk>``), so even random answers print as plain text; ``specials`` are added tokens."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    for character in string.ascii_letters + string.digits + string.punctuation + " \n":
        vocab[character] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if specials:
        tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


_FROM_PRETRAINED_KEYS = ("revision", "dtype", "device_map", "attn_implementation")
#: Each registered name's ``config.model_type``.
_MODEL_TYPES = {
    "llava_1_5_7b": "llava",
    "llava_1_5_13b": "llava",
    "llava_v1_6_mistral_7b": "llava_next",
    "llava_v1_6_vicuna_7b": "llava_next",
    "llava_v1_6_vicuna_13b": "llava_next",
    "qwen2_vl_7b_instruct": "qwen2_vl",
    "qwen2_5_vl_3b_instruct": "qwen2_5_vl",
    "qwen2_5_vl_7b_instruct": "qwen2_5_vl",
    "instructblip_vicuna_7b": "instructblip",
}


def _builder(name: str, hub_id: str):
    def build(pretrained: bool = True, weights: Any = None, **kwargs: Any) -> Any:
        if weights is None and not pretrained:
            unknown = sorted(set(kwargs) - {"seed"})
            if unknown:
                raise InvalidOptionError(f"the tiny random LVLM takes seed= only, got {unknown}")
            return tiny_lvlm(_TINY_FAMILY[name], int(kwargs.get("seed", 0)))
        if weights is not None and not isinstance(weights, (str, os.PathLike)):
            raise InvalidOptionError(
                f"{name} loads through transformers: weights= is a Hub id or a model folder, not a "
                f"{type(weights).__name__}"
            )
        own = {k: kwargs.pop(k) for k in _FROM_PRETRAINED_KEYS if k in kwargs}
        source = hub_id if weights is None else pretrained_source(weights, "weights", f"{_MODEL_TYPES[name]} model")
        return LVLMCheckpoint(
            source,
            **own,
            from_pretrained=kwargs,
            model_type=_MODEL_TYPES[name],
            model_name=name,
        )

    build.__name__ = name
    build.__doc__ = (
        f"{hub_id} (a handle the hallucination-mitigation pipeline loads; random weights: the tiny random LLaVA)."
    )
    return build


for _name, _hub_id in HUB_IDS.items():
    register_model(
        _builder(_name, _hub_id),
        name=_name,
        family="lvlm",
        tasks=("hallucination-mitigation",),
        own_weights=True,
        hub_ids=(_hub_id,),
    )
