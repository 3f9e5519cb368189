"""The registered model of the subject-insertion task: ``flux_fill``.

``create_model("flux_fill")`` with pretrained weights (the default of ``attnzoo.pipeline``) loads
FLUX.1-Fill-dev through diffusers (``weights=`` another Hub id or a local pipeline folder); with random
weights (``weights="none"``) it builds the tiny random configuration instead: random full-size weights
would be 12B parameters of noise, while the tiny model runs end to end in milliseconds (tests, the demo).
"""

from __future__ import annotations

from typing import Any

from attnzoo.registry import register_model

__all__ = ["flux_fill"]


@register_model(
    family="insertion", tasks=("subject-insertion",), own_weights=True, hub_ids=("black-forest-labs/FLUX.1-Fill-dev",)
)
def flux_fill(pretrained: bool = True, weights: Any = None, **kwargs: Any) -> Any:
    """FLUX.1-Fill-dev (keywords go to :func:`~attnzoo.multimodal.insertion.flux.load_flux_fill`: ``dtype``,
    ``device``, ``cpu_offload``, ``revision``); random weights: the tiny configuration (``seed=`` only)."""
    from attnzoo.errors import InvalidInputError
    from attnzoo.multimodal.insertion.flux import FLUX_FILL_ID, load_flux_fill, tiny_flux_fill

    if weights is None and not pretrained:
        unknown = sorted(set(kwargs) - {"seed"})
        if unknown:
            raise InvalidInputError(f"the tiny random flux_fill takes seed= only, got {unknown}")
        return tiny_flux_fill(int(kwargs.get("seed", 0)))
    return load_flux_fill(weights if weights is not None else FLUX_FILL_ID, **kwargs)
