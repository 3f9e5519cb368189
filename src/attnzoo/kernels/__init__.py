"""Attention ops shared by every model: a plain-PyTorch reference, a FlexAttention path and
fused Triton kernels (forward and backward) behind one dispatcher.

>>> with attnzoo.kernels.use_backend("reference"):  # or ATTNZOO_ATTN_BACKEND=reference
...     out = attnzoo.kernels.grouped_attention(q, k, v, groups, route=route)  # doctest: +SKIP

Importing this package never touches a GPU driver; Triton kernels load on first use.
"""

from attnzoo.kernels.dispatch import BACKEND_NAMES, available_backends, forced_backend, use_backend
from attnzoo.kernels.grouped_attention import grouped_attention
from attnzoo.kernels.linear_attention import inline_attention, linear_attention
from attnzoo.kernels.topk_attention import mask_to_index, masked_attention, pack_mask, topk_attention, unpack_mask
from attnzoo.kernels.grouping import across_views, dilated_groups, inverse_routing, region_means, region_routing, window_groups

__all__ = [
    "BACKEND_NAMES",
    "across_views",
    "available_backends",
    "dilated_groups",
    "forced_backend",
    "grouped_attention",
    "inline_attention",
    "inverse_routing",
    "linear_attention",
    "mask_to_index",
    "masked_attention",
    "pack_mask",
    "region_means",
    "region_routing",
    "topk_attention",
    "unpack_mask",
    "use_backend",
    "window_groups",
]
