"""Vision models. Importing this package registers every model family with timm (and ours)."""

from attnzoo.vision import (
    acmil,  # noqa: F401  (registers acmil_ga, acmil_mha, abmil with attnzoo.create_model)
    biformer,  # noqa: F401  (registers biformer_* with timm)
    inline,  # noqa: F401  (registers inline_swin_* and inline_deit_* with timm)
    l2vit,  # noqa: F401  (registers l2vit_* with timm)
    lrgt,  # noqa: F401  (registers lrgt with attnzoo.create_model and its checkpoint entry)
    oat,  # noqa: F401  (registers oat_amazon, oat_yogurt, oat_wine with attnzoo.create_model)
    sparsifiner,  # noqa: F401  (registers sparsifiner_* with timm)
)
