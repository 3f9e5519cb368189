"""Blocks shared by the vision models; attention goes through ``attnzoo.kernels``."""

from attnzoo.vision.layers.routing_attention import AttentionLePE, BiLevelRoutingAttention

__all__ = ["AttentionLePE", "BiLevelRoutingAttention"]
