"""pipeline("subject-insertion") with DataLoader workers: a subject_word is segmented in the calling process,
by one segmenter built once and kept, not by a copy of Grounding DINO + SAM loaded in every worker."""

from __future__ import annotations

import os
import pickle
import threading

import numpy as np
import pytest
from PIL import Image

import attnzoo.multimodal.insertion.segment as segment
from attnzoo.errors import InvalidInputError

pytestmark = pytest.mark.usefixtures("one_thread")


def photo(h, w, seed):
    rng = np.random.default_rng(seed)
    return np.asarray(Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((w, h)))


SUBJECT, TARGET = photo(20, 24, 0), photo(30, 40, 1)
MASK = np.zeros((30, 40), bool)
MASK[8:22, 10:30] = True
SUBJECT_MASK = np.zeros((20, 24), bool)
SUBJECT_MASK[3:15, 2:12] = True


class Segmenter:
    """Records where (which process) it is built and used; finds no subject for the word 'nothing'."""

    built: list[tuple[int, object]] = []
    used: list[int] = []

    def __init__(self, device=None):
        Segmenter.built.append((os.getpid(), device))

    def __call__(self, image, word):
        Segmenter.used.append(os.getpid())
        if word == "nothing":
            raise InvalidInputError("no 'nothing' found in the subject image")
        return SUBJECT_MASK.copy()


@pytest.fixture
def stub(monkeypatch):
    Segmenter.built, Segmenter.used = [], []
    monkeypatch.setattr(segment, "SubjectSegmenter", Segmenter)
    return Segmenter


@pytest.fixture(scope="module")
def tiny():
    from attnzoo.multimodal.insertion.flux import tiny_flux_fill

    return tiny_flux_fill(0)


def test_subject_words_are_segmented_once_in_this_process(tiny, stub):
    """preprocess built a SubjectSegmenter in each DataLoader worker (the parent's stayed None, the next call
    built them again; with CUDA the worker's .to('cuda') raised in the forked process)."""
    from attnzoo.pipelines.subject_insertion import SubjectInsertionPipeline

    pipe = SubjectInsertionPipeline(tiny, panel_size=16, steps=1, device="cpu")
    items = [
        {"target": TARGET, "subject": SUBJECT, "mask": MASK, "prompt": "x", "subject_word": "dog"},
        {"target": TARGET, "subject": SUBJECT, "mask": MASK, "prompt": "x", "subject_mask": SUBJECT_MASK},
        {"target": TARGET, "subject": SUBJECT, "mask": MASK, "prompt": "x", "subject_word": "nothing"},
        {"target": TARGET, "subject": SUBJECT, "mask": MASK, "prompt": "x", "subject_word": "dog", "seed": 3},
    ]
    got = list(pipe.iterate(items, num_workers=2, batch_size=2, on_error="skip"))
    assert [index for index, _ in got] == [0, 1, 2, 3]
    assert isinstance(got[2][1], InvalidInputError) and "no 'nothing' found" in str(got[2][1])
    assert stub.built == [(os.getpid(), pipe.device)] and isinstance(pipe.segmenter, Segmenter)
    assert stub.used == [os.getpid()] * 3
    again = pipe(items[:1] + items[3:], num_workers=1)  # the next call: the same segmenter
    assert len(stub.built) == 1 and stub.used == [os.getpid()] * 5
    plain = SubjectInsertionPipeline(tiny, panel_size=16, steps=1, device="cpu", segmenter=Segmenter())
    for (_, result), mine, item in zip([got[0], got[1], got[3]], [again[0], None, again[1]], [0, 1, 3]):
        reference = plain(items[item])  # without workers
        np.testing.assert_array_equal(result.subject_mask, SUBJECT_MASK)
        np.testing.assert_array_equal(np.asarray(result.image), np.asarray(reference.image))
        if mine is not None:
            np.testing.assert_array_equal(np.asarray(mine.image), np.asarray(reference.image))
    with pytest.raises(InvalidInputError, match="no 'nothing' found"):
        pipe([items[2]], num_workers=1)
    with pytest.raises(InvalidInputError, match="prompt= is required"):  # still checked in the worker
        pipe([{**items[0], "prompt": ""}], num_workers=1)


def test_call_settings_reach_the_subjects_segmented_here(tiny, stub):
    """An input segmented in the calling process is prepared with the call's settings (panel_size), not the
    constructor's, and keeps the call's per-input seed; the reference takes both from its constructor, with the
    mask given (nothing to segment there)."""
    from attnzoo.pipelines.subject_insertion import SubjectInsertionPipeline

    item = {"target": TARGET, "subject": SUBJECT, "mask": MASK, "prompt": "x"}
    pipe = SubjectInsertionPipeline(tiny, panel_size=16, steps=1, device="cpu")
    words = [{**item, "subject_word": "dog"}]
    ((index, got),) = pipe.iterate(words, num_workers=1, panel_size=32, seed=5)
    (called,) = pipe(words, panel_size=32, seed=5)  # without workers
    reference = SubjectInsertionPipeline(tiny, panel_size=32, seed=5, steps=1, device="cpu")
    expected = reference({**item, "subject_mask": SUBJECT_MASK})
    assert index == 0 and got.seed == called.seed == expected.seed == 5
    for result in (got, called):
        np.testing.assert_array_equal(result.subject_mask, SUBJECT_MASK)
        assert result.canvas.size == expected.canvas.size == (32, 64)  # the constructor's: (16, 32)
        np.testing.assert_array_equal(np.asarray(result.image), np.asarray(expected.image))


def test_threads_share_one_segmenter_and_load_each_model_once(monkeypatch):
    """Two threads on one SubjectSegmenter each loaded Grounding DINO (and SAM) when both found it unloaded."""
    meet = threading.Barrier(2)
    loads = []

    def loader(name, model):
        def load(self):
            loads.append(name)
            try:
                meet.wait(timeout=0.5)  # a second loader, if any, arrives meanwhile
            except threading.BrokenBarrierError:
                pass
            return model

        return load

    monkeypatch.setattr(
        segment.SubjectSegmenter, "_load_detector", loader("detector", lambda image, w: [(0.9, (2, 3, 12, 15))])
    )
    monkeypatch.setattr(segment.SubjectSegmenter, "_load_sam", loader("sam", lambda image, box: SUBJECT_MASK))
    segmenter = segment.SubjectSegmenter("some/detector", "some/sam")
    masks = {}

    def run(k):
        masks[k] = segmenter(Image.fromarray(SUBJECT), "dog")

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(loads) == ["detector", "sam"]
    np.testing.assert_array_equal(masks[0], SUBJECT_MASK)
    np.testing.assert_array_equal(masks[1], SUBJECT_MASK)
    with segmenter._loading:  # held here: a copy (as a spawned worker gets it) has a lock of its own, free
        copy = pickle.loads(pickle.dumps(segment.SubjectSegmenter("some/detector", "some/sam")))
        assert copy._loading._lock.acquire(blocking=False)
