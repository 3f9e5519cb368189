"""Vision models. Importing this package registers every model family with timm (and ours)."""

from attnzoo.vision import biformer  # noqa: F401  (registers biformer_* with timm)
from attnzoo.vision import l2vit  # noqa: F401  (registers l2vit_* with timm)
from attnzoo.vision import sparsifiner  # noqa: F401  (registers sparsifiner_* with timm)
from attnzoo.vision import inline  # noqa: F401  (registers inline_swin_* and inline_deit_* with timm)
from attnzoo.vision import lrgt  # noqa: F401  (registers lrgt with attnzoo.create_model and its checkpoint entry)
from attnzoo.vision import acmil  # noqa: F401  (registers acmil_ga, acmil_mha, abmil with attnzoo.create_model)
from attnzoo.vision import oat  # noqa: F401  (registers oat_amazon, oat_yogurt, oat_wine with attnzoo.create_model)
