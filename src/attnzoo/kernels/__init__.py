"""Attention ops shared by every model, each with up to three backends behind one dispatcher:
``torch`` (plain PyTorch, the CPU default, in the fastest exact formulation for the call),
``flex`` (FlexAttention with a block mask built from the indices) and ``triton`` (fused
forward and backward kernels). The semantics are defined by ``attnzoo.kernels.oracle``, a
deliberately simple implementation that only the tests use.

>>> with attnzoo.kernels.use_backend("torch"):  # or ATTNZOO_ATTN_BACKEND=torch
...     out = attnzoo.kernels.grouped_attention(q, k, v, groups, route=route)  # doctest: +SKIP

Importing this package never touches a GPU driver; Triton kernels load on first use.
"""

from attnzoo.kernels.boosted_attention import Boost, BoostedAttentionOutput, boosted_attention
from attnzoo.kernels.dispatch import (
    BACKEND_NAMES,
    available_backends,
    dispatch_counts,
    forced_backend,
    reset_dispatch_counts,
    use_backend,
)
from attnzoo.kernels.grouped_attention import grouped_attention
from attnzoo.kernels.grouping import (
    across_views,
    dilated_groups,
    inverse_routing,
    region_means,
    region_routing,
    window_groups,
)
from attnzoo.kernels.linear_attention import inline_attention, l2vit_linear_attention
from attnzoo.kernels.masked_attention import masked_attention, pack_mask, unpack_mask
from attnzoo.kernels.redistributed_attention import (
    RedistributionKeys,
    redistributed_decode_attention,
    redistribution_keys,
)

__all__ = [
    "BACKEND_NAMES",
    "Boost",
    "BoostedAttentionOutput",
    "across_views",
    "available_backends",
    "boosted_attention",
    "dilated_groups",
    "dispatch_counts",
    "forced_backend",
    "grouped_attention",
    "inline_attention",
    "inverse_routing",
    "l2vit_linear_attention",
    "masked_attention",
    "pack_mask",
    "RedistributionKeys",
    "redistributed_decode_attention",
    "redistribution_keys",
    "region_means",
    "region_routing",
    "reset_dispatch_counts",
    "unpack_mask",
    "use_backend",
    "window_groups",
]
