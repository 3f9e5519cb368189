"""Blocks shared by the vision models; attention goes through ``attnzoo.kernels``."""

from attnzoo.vision.layers.routing_attention import (
    AttentionLePE,
    BiLevelRoutingAttention,
    NCHWAttentionLePE,
    NCHWBiLevelRoutingAttention,
)

__all__ = ["AttentionLePE", "BiLevelRoutingAttention", "NCHWAttentionLePE", "NCHWBiLevelRoutingAttention"]
