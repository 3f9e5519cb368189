"""pipeline("wsi-classification") with DataLoader workers and from several threads: slides are embedded in
the calling process, and one random encoder (seed 0) is built per setting whoever asks first."""

import pickle
import threading

import numpy as np
import openslide  # noqa: F401  (the wsi extra: installed with .[all])
import pytest
import torch

import attnzoo
import attnzoo.pipelines.wsi_features as wsi_features
from attnzoo.errors import InvalidInputError
from attnzoo.pipelines.wsi_classification import SlidePrediction
from tests.wsi_helpers import slide_image, write_slide

SETTINGS = {
    "encoder": "resnet18",
    "encoder_weights": "none",
    "magnification": 20,
    "patch_size": 112,
    "input_size": 32,
    "segment_kwargs": {"a_t": 1},
    "progress": False,
}


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("slide") / "slide.tif")


@pytest.fixture(scope="module")
def reference(slide, tmp_path_factory):
    """The slide's prediction by a pipeline of its own, in one thread, without workers; its feature file."""
    pipe = make(tmp_path_factory.mktemp("reference"))
    prediction = pipe(slide, num_workers=0)
    (features,) = pipe.feature_dir.glob("slide-*.h5")
    return prediction, features


def make(tmp_path, name="feats", **settings):
    torch.manual_seed(0)
    model = attnzoo.create_model("acmil_ga", in_dim=512, inner_dim=32)
    settings = {**SETTINGS, **settings}
    return attnzoo.pipeline("wsi-classification", model=model, device="cpu", feature_dir=tmp_path / name, **settings)


def test_slides_with_workers_are_embedded_in_the_calling_process(slide, reference, tmp_path):
    """extract_features ran inside the DataLoader worker: its own reading workers cannot start there (a
    daemonic process has no children) and on CUDA the encoder would go to the GPU in a forked process."""
    alone, features = reference
    pipe = make(tmp_path)
    bag = torch.randn(6, 512)
    blank = write_slide(tmp_path / "blank.tif", slide_image(blobs=()))
    got = list(pipe.iterate([slide, bag, blank, features], num_workers=1, batch_size=2, on_error="skip"))
    assert [index for index, _ in got] == [0, 1, 2, 3]
    (_, first), (_, tensor), (_, refused), (_, from_file) = got
    assert isinstance(first, SlidePrediction) and first.encoder == "resnet18, random (seed 0)"
    np.testing.assert_allclose(first.probabilities, alone.probabilities, atol=1e-6)
    np.testing.assert_array_equal(first.coords, alone.coords)
    np.testing.assert_allclose(tensor.probabilities, pipe(bag).probabilities, atol=1e-6)  # a bag beside a slide
    assert isinstance(refused, InvalidInputError) and "no tissue" in str(refused)
    np.testing.assert_allclose(from_file.probabilities, alone.probabilities, atol=1e-6)  # a file, read in a worker
    assert len(pipe._encoders) == 1  # built here, once, not in a worker
    assert len(list(pipe.feature_dir.glob("*.h5"))) == 1
    copy = pickle.loads(pickle.dumps(pipe))  # as spawned workers get it: its lock is not pickled, but remade
    np.testing.assert_allclose(copy(bag).probabilities, tensor.probabilities, atol=1e-6)


def test_call_settings_reach_the_slides_embedded_here(slide, reference, tmp_path):
    """A slide is embedded in the calling process with the call's settings, not the constructor's: read from
    the constructor's alone, magnification=10 and feature_dir= given to the call were dropped."""
    alone, _ = reference
    pipe = make(tmp_path)  # magnification 20
    ((index, got),) = pipe.iterate([slide], num_workers=1, magnification=10, feature_dir=tmp_path / "call")
    ten = make(tmp_path, "ten", magnification=10)(slide, num_workers=0)  # the constructor's settings, no workers
    assert index == 0 and len(got.coords) == len(ten.coords) < len(alone.coords)
    np.testing.assert_array_equal(got.coords, ten.coords)
    np.testing.assert_allclose(got.probabilities, ten.probabilities, atol=1e-6)
    assert len(list((tmp_path / "call").glob("slide-*.h5"))) == 1
    assert not list(pipe.feature_dir.glob("*.h5"))
    called = pipe(slide, magnification=10)  # through __call__, in this process
    np.testing.assert_array_equal(called.coords, ten.coords)
    np.testing.assert_allclose(called.probabilities, ten.probabilities, atol=1e-6)


def test_threads_share_one_random_encoder_built_once(slide, reference, tmp_path, monkeypatch):
    """Both threads found the cache empty and built the encoder at once, each seeding torch's one global
    generator: their weights (and the features) differed from run to run, and so did a later call's."""
    real = wsi_features.create_model
    meet = threading.Barrier(2)
    builds = []

    def create_model(*args, **kwargs):  # lets two builds meet, as two threads starting together do
        builds.append(threading.get_ident())
        try:
            meet.wait(timeout=0.5)
        except threading.BrokenBarrierError:
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(wsi_features, "create_model", create_model)
    pipe = make(tmp_path)
    out, start = {}, threading.Barrier(2)

    def work(k):
        start.wait()
        out[k] = pipe(slide)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(pipe._encoders) == 1
    later = pipe(slide)
    for result in (out[0], out[1], later):  # as another pipeline's, alone
        assert result.encoder == "resnet18, random (seed 0)"
        np.testing.assert_array_equal(result.probabilities, reference[0].probabilities)
    (module, digest, _, _), *_ = pipe._encoders.values()
    assert digest == wsi_features.weights_digest(wsi_features.create_patch_encoder("resnet18", "none"))


def test_a_seeded_encoder_build_waits_for_another(monkeypatch):
    """create_patch_encoder itself: two random builds at once (two pipelines, two threads) interleaved their
    draws from the one global generator, and the second fork_rng restored the first one's seed-0 state."""
    real = wsi_features.create_model
    meet = threading.Barrier(2)

    def create_model(*args, **kwargs):
        try:
            meet.wait(timeout=0.5)
        except threading.BrokenBarrierError:
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(wsi_features, "create_model", create_model)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    digests = {}

    def build(k):
        digests[k] = wsi_features.weights_digest(wsi_features.create_patch_encoder("resnet18", "none"))

    threads = [threading.Thread(target=build, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.setattr(wsi_features, "create_model", real)
    assert (
        digests[0] == digests[1] == wsi_features.weights_digest(wsi_features.create_patch_encoder("resnet18", "none"))
    )
    assert torch.equal(torch.get_rng_state(), before)
