"""The KV cache CARVE's probes and final pass decode on (kv_cache.ReservedLayer): the same keys,
values and answers as transformers' DynamicCache, each new token written in place, and a cache whose
tensors something else replaced (row selection, cropping, a copy) moved into fresh room first."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import MistralConfig
from transformers.cache_utils import DynamicCache, DynamicLayer

from attnzoo.multimodal.hallucination.kv_cache import MIN_RESERVE, ReservedLayer, reserved_cache, select_rows
from attnzoo.multimodal.hallucination.layouts import family_of
from attnzoo.multimodal.hallucination.transformers_compat import cache_keyword
from tests.lvlm_helpers import sharpen_attention
from tests.multimodal.lvlm_prompts import photos, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def states(rows, length, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, length, 4, generator=generator), torch.randn(rows, 2, length, 4, generator=generator)


def test_a_reserved_layer_holds_what_concatenation_holds_and_writes_in_place():
    layer, expected_keys, expected_values = ReservedLayer(), None, None
    for step, length in enumerate([5, 1, 1, 3, MIN_RESERVE, 1]):
        keys, values = states(2, length, step)
        room = layer._key_room if layer.is_initialized else None
        got_keys, got_values = layer.update(keys, values)
        expected_keys = keys if expected_keys is None else torch.cat([expected_keys, keys], dim=-2)
        expected_values = values if expected_values is None else torch.cat([expected_values, values], dim=-2)
        assert torch.equal(got_keys, expected_keys) and torch.equal(got_values, expected_values)
        assert layer.get_seq_length() == expected_keys.shape[-2]
        if step in (1, 2, 3):  # decoding within the room: no new buffer, the keys are a view of it
            assert layer._key_room is room and got_keys.data_ptr() == room.data_ptr()
        if step == 4:  # past the room: moved into a larger one
            assert layer._key_room is not room and layer._key_room.shape[-2] > expected_keys.shape[-2]


def test_a_reserved_layer_moves_when_its_tensors_are_replaced():
    """Row selection (CARVE's prefix copied to its rows, a final pass starting from one row per
    prompt), cropping and a deep copy: the next write goes where the layer's tensors now are."""
    layer = ReservedLayer()
    layer.update(*states(3, 6, 0))
    layer.batch_select_indices(torch.tensor([2, 0, 0]))
    selected = layer.keys.clone()
    new_keys, new_values = states(3, 1, 1)
    keys, _ = layer.update(new_keys, new_values)
    assert torch.equal(keys, torch.cat([selected, new_keys], dim=-2))

    layer.crop(-2)  # the last two tokens dropped: the next ones overwrite their places
    kept = layer.keys.clone()
    keys, _ = layer.update(*states(3, 1, 2))
    assert torch.equal(keys[:, :, :-1], kept) and keys.shape[-2] == kept.shape[-2] + 1

    twin = copy.deepcopy(layer)
    before = layer.keys.clone()
    twin_new, mine_new = states(3, 1, 3), states(3, 1, 4)
    twin_keys, _ = twin.update(*twin_new)
    mine_keys, _ = layer.update(*mine_new)
    assert torch.equal(twin_keys, torch.cat([before, twin_new[0]], dim=-2))
    assert torch.equal(mine_keys, torch.cat([before, mine_new[0]], dim=-2))

    shared = copy.deepcopy(layer, memo={id(t): t for t in vars(layer).values() if isinstance(t, torch.Tensor)})
    shared.batch_select_indices(torch.tensor([0]))  # as CachedPrefix.generate_inputs copies a cache
    before = layer.keys.clone()
    shared.update(*states(1, 1, 5))
    assert torch.equal(layer.keys, before)  # the original's room is untouched

    with pytest.raises(RuntimeError):  # other rows than held: refused as concatenation refuses them
        layer.update(*states(2, 1, 6))


def test_reserved_cache_keeps_the_sliding_window_layers_of_the_model():
    config = MistralConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, sliding_window=8, layer_types=["sliding_attention", "full_attention", "full_attention"],
    )  # fmt: skip
    stock, ours = DynamicCache(config=config), reserved_cache(config)
    assert [type(layer) for layer in ours.layers] == [type(stock.layers[0]), ReservedLayer, ReservedLayer]
    assert type(stock.layers[1]) is DynamicLayer
    assert isinstance(ours, DynamicCache)


def test_select_rows_copies_rows_into_room_for_the_next_tokens_and_leaves_the_source_alone():
    """CARVE's prefix cache copied to its probe rows and to the final pass's prompts: the selected rows
    equal transformers' row selection, the next ``room_for`` tokens are written in place (one copy
    of the prefix, where selecting and then writing copied it twice), and the source serves again."""
    config = MistralConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, sliding_window=8, layer_types=["sliding_attention", "full_attention", "full_attention"],
    )  # fmt: skip
    source = reserved_cache(config)
    for index in range(3):
        source.update(*states(2, 7, index), index)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in source.layers]
    stock = copy.deepcopy(source)
    stock.batch_select_indices(torch.tensor([1, 0, 1]))

    selected = select_rows(source, [1, 0, 1], room_for=5)
    for layer, expected in zip(selected.layers, stock.layers, strict=True):
        assert type(layer) is type(expected)
        assert torch.equal(layer.keys, expected.keys) and torch.equal(layer.values, expected.values)
    full = selected.layers[1]
    room = full._key_room
    for step in range(5):  # the room's promise: these writes move nothing
        keys, values = states(3, 1, 10 + step)
        got, _ = full.update(keys, values)
        assert full._key_room is room and got.data_ptr() == room.data_ptr()
        assert torch.equal(got[:, :, -1:], keys)
    for layer, (keys, values) in zip(source.layers, before, strict=True):  # the source is as it was
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    again = select_rows(source, [0])
    assert torch.equal(again.layers[2].keys, before[2][0][:1])
    assert select_rows(reserved_cache(config), [0, 0]).get_seq_length() == 0  # an empty cache stays empty


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_generate_on_a_reserved_cache_answers_as_on_the_dynamic_cache(family):
    model, encode = tiny_model(family)
    sharpen_attention(model)
    images = [photo.resize((112, 84)) for photo in photos(2)]
    inputs = encode(images, ["is there a dog", "what color is the car on the left"])  # left-padded
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    stock = model.generate(**inputs, **settings)
    cache = reserved_cache(family_of(model).text_config())
    ours = model.generate(**inputs, **settings, **{cache_keyword(): cache})
    assert torch.equal(ours.sequences, stock.sequences)
    for a, b in zip(ours.scores, stock.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert all(isinstance(layer, ReservedLayer) for layer in cache.layers)
