"""``pipeline("multiview-3d-reconstruction")`` settings mean what ``preprocess_views``'s do: ``background=None``
keeps the pixels (it meant 240), ``colour_order`` in any case, and a background that cannot be used is refused
when it is given (it was refused only at the first call)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnzoo
from attnzoo.errors import InvalidOptionError
from attnzoo.pipelines.multiview_reconstruction import preprocess_views
from attnzoo.vision import lrgt as L
from tests.pipelines.test_multiview_reconstruction import TINY, rendering


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return L.LRGT(**TINY, noise_seed=0).eval()


def expected(model, views, **settings):
    """The model on ``preprocess_views(views, **settings)``: what the pipeline must give with those settings."""
    with torch.no_grad():
        return model(preprocess_views(views, **settings)[None])[0].numpy()


def test_background_none_keeps_the_pixels_as_preprocess_views_does(model):
    views = [rendering(seed) for seed in range(2)]  # RGBA with transparent pixels
    keep, grey = expected(model, views, background=None), expected(model, views, background=240)
    assert not np.allclose(keep, grey)  # the setting shows in the output
    given = attnzoo.pipeline("multiview-3d-reconstruction", model=model, device="cpu", background=None)
    np.testing.assert_allclose(given(views).probabilities, keep, atol=1e-6)
    plain = attnzoo.pipeline("multiview-3d-reconstruction", model=model, device="cpu")
    np.testing.assert_allclose(plain(views).probabilities, grey, atol=1e-6)  # not given: 240
    np.testing.assert_allclose(plain(views, background=None).probabilities, keep, atol=1e-6)
    black = attnzoo.pipeline("multiview-3d-reconstruction", model=model, device="cpu", background=0)
    np.testing.assert_allclose(black(views, background=None).probabilities, keep, atol=1e-6)  # the call's None wins


def test_colour_order_is_read_in_any_case_as_preprocess_views_reads_it(model):
    views = [rendering(3)]
    rgb = expected(model, views, colour_order="rgb")
    for order in ("RGB", "Rgb"):
        recon = attnzoo.pipeline("multiview-3d-reconstruction", model=model, device="cpu", colour_order=order)
        np.testing.assert_allclose(recon(views).probabilities, rgb, atol=1e-6)
    recon = attnzoo.pipeline("multiview-3d-reconstruction", model=model, device="cpu")
    np.testing.assert_allclose(recon(views, colour_order="BGR").probabilities, expected(model, views), atol=1e-6)
    with pytest.raises(InvalidOptionError, match="colour_order must be 'bgr' or 'rgb'"):
        attnzoo.pipeline("multiview-3d-reconstruction", model=model, device="cpu", colour_order="hsv")


def test_a_background_that_cannot_be_used_is_refused_when_given(model):
    for bad in (300, -1, (1, 2), "white", 1.5, True):
        with pytest.raises(InvalidOptionError, match="background must be an int 0-255"):
            attnzoo.pipeline("multiview-3d-reconstruction", model=model, device="cpu", background=bad)
    recon = attnzoo.pipeline("multiview-3d-reconstruction", model=model, device="cpu")
    with pytest.raises(InvalidOptionError, match="background must be an int 0-255"):
        recon([rendering(0)], background=300)
    triple = attnzoo.pipeline("multiview-3d-reconstruction", model=model, device="cpu", background=(10, 20, 30))
    views = [rendering(4)]
    np.testing.assert_allclose(triple(views).probabilities, expected(model, views, background=(10, 20, 30)), atol=1e-6)


def test_views_as_file_objects_one_given_twice_with_workers(model):
    """An object's views as open files: each read once in this process (the same file twice, for two views, was
    read by workers at one shared position); a lone file object is one object (refused as such), not a batch of
    its byte lines."""
    import io

    from PIL import Image

    from attnzoo.errors import InvalidInputError

    views = [rendering(seed) for seed in range(2)]
    files = []
    for view in views:
        files.append(io.BytesIO())
        Image.fromarray(view).save(files[-1], "PNG")
        files[-1].seek(0)
    pipe = attnzoo.pipeline("multiview-3d-reconstruction", model=model, device="cpu")
    wanted = pipe([views[0], views[1], views[0]]).probabilities
    got = pipe([[files[0], files[1], files[0]]] * 2, num_workers=2)
    for result in got:
        np.testing.assert_allclose(result.probabilities, wanted, atol=1e-6)
    assert all(f.tell() == 0 for f in files)
    assert pipe.is_single(files[0]) and not pipe.is_single([[files[0]], [files[1]]])
    with pytest.raises(InvalidInputError, match="a non-empty list of views"):
        pipe(files[0])
