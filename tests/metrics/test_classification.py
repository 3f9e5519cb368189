import numpy as np
import pytest
import torch
from sklearn.metrics import top_k_accuracy_score

from attnzoo.errors import InvalidInputError
from attnzoo.metrics import topk_accuracy, topk_accuracy_from_ranked


@pytest.mark.parametrize("seed", range(5))
def test_topk_matches_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 60)), int(rng.integers(6, 30))
    logits, targets = rng.normal(size=(n, c)), rng.integers(0, c, n)
    ours = topk_accuracy(logits, targets, ks=(1, 3, 5))
    for k in (1, 3, 5):
        assert ours[k] == pytest.approx(100 * top_k_accuracy_score(targets, logits, k=k, labels=np.arange(c)))
    assert topk_accuracy(torch.from_numpy(logits), targets) == topk_accuracy(logits, targets)


def test_ranked_shorter_than_k_counts_all():
    assert topk_accuracy_from_ranked([[2, 0], [1, 0]], [0, 2], ks=(1, 5)) == {1: 0.0, 5: 50.0}


def test_bad_inputs():
    with pytest.raises(InvalidInputError):
        topk_accuracy_from_ranked([[1]], [1, 2])
    with pytest.raises(InvalidInputError):
        topk_accuracy_from_ranked([], [])
    with pytest.raises(InvalidInputError):
        topk_accuracy(np.zeros(3), [0])
