"""A KV cache that decodes without copying itself.

transformers' ``DynamicLayer`` concatenates its whole cache with every new token: each decoding step
copies the cache, which on a long prompt (CARVE's final pass holds two images) or a small model is a
large share of the step. :class:`ReservedLayer` keeps room for more tokens and writes each new one
in place, handing the attention the filled part as a view: the same keys and values, so the same
outputs. Whatever replaces a layer's tensors (row selection, beam reordering, offloading) is noticed
at the next write, which moves the cache into fresh room; after ``crop`` (fewer tokens) the next
tokens are written over the dropped places, so a view returned before the crop changes (a
``DynamicLayer``'s returned tensors never do). A cache shared by two generations must be
deep-copied, as a ``DynamicCache`` must be.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

#: Room added past the tokens written, at least this many tokens, or a quarter of them: a long
#: decode moves the cache O(log n) times instead of copying it every step.
MIN_RESERVE = 64


class ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views into a larger buffer."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_room: torch.Tensor | None = None
        self._value_room: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.get_seq_length()
        total = held + key_states.shape[-2]
        if self._writes_in_place(key_states, value_states, held, total):
            assert self._key_room is not None and self._value_room is not None
            self._key_room[:, :, held:total] = key_states
            self._value_room[:, :, held:total] = value_states
        else:  # the concatenation transformers does (and its errors), moved into room for more
            keys = torch.cat([self.keys, key_states], dim=-2) if held else key_states
            values = torch.cat([self.values, value_states], dim=-2) if held else value_states
            self._key_room, self._value_room = _with_room(keys), _with_room(values)
        self.keys = self._key_room[:, :, :total]
        self.values = self._value_room[:, :, :total]
        return self.keys, self.values

    def _writes_in_place(self, keys: torch.Tensor, values: torch.Tensor, held: int, total: int) -> bool:
        """Whether the layer's tensors are still the views this layer made (nothing replaced them) and
        the new states fit the room's rows, heads, width, dtype and length."""
        rooms = (self._key_room, self._value_room)
        held_tensors = (self.keys, self.values)
        if held == 0 or rooms[0] is None or rooms[1] is None:
            return False
        for room, tensor, new in zip(rooms, held_tensors, (keys, values), strict=True):
            if (
                tensor is None
                or tensor.data_ptr() != room.data_ptr()
                or tensor.stride() != room.stride()
                or tensor.shape != (*room.shape[:2], held, room.shape[-1])
                or room.shape[-2] < total
                or new.shape[:2] != room.shape[:2]
                or new.shape[-1] != room.shape[-1]
                or new.dtype != room.dtype
                or new.device != room.device
            ):
                return False
        return True

    def reset(self) -> None:
        self._key_room = self._value_room = None
        super().reset()


def _room_length(length: int) -> int:
    return length + max(MIN_RESERVE, length // 4)


def _with_room(states: torch.Tensor) -> torch.Tensor:
    length = states.shape[-2]
    room = states.new_empty((*states.shape[:-2], _room_length(length), states.shape[-1]))
    room[:, :, :length] = states
    return room


def select_rows(cache: DynamicCache, rows: Sequence[int], room_for: int = 0) -> DynamicCache:
    """A new cache of rows ``rows`` of ``cache`` (a row may repeat), ``cache`` left as it is (a prefix
    cache serves several continuations). Each :class:`ReservedLayer`'s rows are copied once, straight
    into room for ``room_for`` more tokens, so the next writes land in place; transformers'
    ``batch_select_indices`` gathers into new tensors that the next write copies again. Other
    layers are selected as transformers selects them."""
    rows = [int(row) for row in rows]
    tensors = [t for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    selected = copy.deepcopy(cache, memo={id(t): t for t in tensors})  # the structure; the tensors are replaced
    for layer in selected.layers:
        if not isinstance(layer, ReservedLayer) or layer.get_seq_length() == 0:
            layer.batch_select_indices(torch.tensor(rows))  # CPU indices serve a cache on any device
            continue
        held = layer.keys.shape[-2]
        rooms = []
        for states in (layer.keys, layer.values):
            room = states.new_empty((len(rows), states.shape[1], _room_length(held + room_for), states.shape[-1]))
            for index, row in enumerate(rows):
                room[index, :, :held] = states[row]
            rooms.append(room)
        layer._key_room, layer._value_room = rooms
        layer.keys, layer.values = rooms[0][:, :, :held], rooms[1][:, :, :held]
    return selected


def reserved_cache(config: Any) -> DynamicCache:
    """The ``DynamicCache`` a model of ``config`` (its language model's) builds for itself, with every
    plain ``DynamicLayer`` (not the sliding-window ones) a :class:`ReservedLayer`."""
    cache = DynamicCache(config=config)
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[index] = ReservedLayer()
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = ReservedLayer
    return cache


__all__ = ["MIN_RESERVE", "ReservedLayer", "reserved_cache", "select_rows"]
