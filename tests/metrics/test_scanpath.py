"""Scanpath metrics against reference packages (nltk's edit distance, multimatch-gaze's
docomparison) and hand-computed cases of the FixaTons / GazeParser / OAT definitions."""

import math
import random

import multimatch_gaze
import numpy as np
import pytest
import torch
from nltk import edit_distance as edit_distance_nltk
from scipy.stats import zscore

from attnzoo.errors import InvalidInputError
from attnzoo.metrics.scanpath import (
    OAT_LAYOUTS,
    SEARCH_STATISTICS,
    average_search_statistics,
    behavioural_delta,
    edit_distance,
    fixation_nss,
    multimatch,
    needleman_wunsch_score,
    nss,
    objects_to_points,
    pad_scanpath,
    sbtde_distance,
    sbtde_similarity,
    scaled_tde_similarity,
    scanmatch,
    scanpath_plausibility,
    scanpath_to_string,
    search_statistics,
    search_statistics_over_samples,
    sequence_score,
    time_delay_embedding_distance,
)

MM_KEYS = ("vector", "direction", "length", "position", "duration")


def letters_path(word):
    """Points whose FixaTons string on a 40x40 image, 4x4 grid (10 px cells) is ``word``."""
    cells = [ord(ch) - ord("a") for ch in word]
    return np.array([[10 * (c % 4) + 5, 10 * (c // 4) + 5] for c in cells], dtype=float)


# --- edit distance ----------------------------------------------------------------------------


@pytest.mark.parametrize("transpositions", [False, True])
def test_edit_distance_matches_nltk_on_random_strings(transpositions):
    rng = random.Random(0)
    for _ in range(400):
        a = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 8)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 8)))
        assert edit_distance(a, b, transpositions=transpositions) == edit_distance_nltk(
            a, b, transpositions=transpositions
        )
    for _ in range(50):
        a = [rng.randint(0, 5) for _ in range(rng.randint(0, 10))]
        b = [rng.randint(0, 5) for _ in range(rng.randint(0, 10))]
        assert edit_distance(a, b, transpositions=transpositions, substitution_cost=2) == edit_distance_nltk(
            a, b, substitution_cost=2, transpositions=transpositions
        )


def test_edit_distance_hand_cases():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("ab", "ba") == 2
    assert edit_distance("ab", "ba", transpositions=True) == 1
    assert edit_distance("ca", "abc") == 3
    assert edit_distance("ca", "abc", transpositions=True) == 2  # unrestricted Damerau (nltk), not OSA (3)
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3 and edit_distance("", "") == 0
    assert edit_distance([1, 2, 3], np.array([1, 3])) == 1
    assert edit_distance(torch.tensor([4, 5]), [5, 4], transpositions=True) == 1


def test_edit_distance_rejects_nan_padding():
    with pytest.raises(InvalidInputError, match="NaN"):
        edit_distance(np.array([1.0, np.nan]), [1])


# --- stringification and time-delay embeddings -------------------------------------------------


def test_scanpath_to_string_cells_row_major():
    size = (100, 80)  # 4x4 grid: cells of 25 x 20 px
    pts = [[0, 0], [99, 0], [0, 79], [50, 40], [24.9, 19.9], [25, 20]]
    assert scanpath_to_string(pts, size) == "a" + "d" + "m" + "k" + "a" + "f"
    assert scanpath_to_string([[65, 25]], (90, 40), grid=(2, 3)) == "f"  # 30x20 cells: row 1, col 2 -> 5
    assert scanpath_to_string(np.zeros((0, 2)), size) == ""


def test_scanpath_to_string_border_clip_vs_fixatons():
    # FixaTons bins x=100 on a 100-wide image into column 4, i.e. the next row's first letter
    assert scanpath_to_string([[100, 0]], (100, 80), clip=False) == "e"
    assert scanpath_to_string([[100, 0]], (100, 80)) == "d"
    # width 103 -> 25-px cells; x=101 lies in the 3 px left over past the last cell
    assert scanpath_to_string([[101, 79]], (103, 80), clip=False) == chr(ord("a") + 4 + 3 * 4)
    assert scanpath_to_string([[101, 79]], (103, 80)) == "p"
    assert scanpath_to_string([[-5, -5]], (100, 80)) == "a"


def test_tde_distance_hand_case():
    human = np.array([[0, 0], [100, 0], [200, 0], [300, 0]], dtype=float)
    model = np.array([[0, 3], [100, 0], [200, 0], [300, 4]], dtype=float)
    # k=2 windows: the first is 3 px off in one point, the middle matches, the last is 4 px off
    assert time_delay_embedding_distance(human, model, k=2) == pytest.approx((1.5 + 0 + 2) / 3)
    assert time_delay_embedding_distance(human, model, k=2, reduce="hausdorff") == pytest.approx(2.0)
    assert time_delay_embedding_distance(human, human, k=3) == 0.0
    shifted = human + [0, 6]
    assert time_delay_embedding_distance(human, shifted, k=4) == pytest.approx(6 / math.sqrt(4))


def test_tde_is_asymmetric_with_human_as_reference():
    human = np.array([[0, 0], [10, 0]], dtype=float)
    model = np.array([[0, 0], [10, 0], [500, 0]], dtype=float)
    assert time_delay_embedding_distance(human, model, k=1) == pytest.approx(490 / 3)
    assert time_delay_embedding_distance(model, human, k=1) == 0.0


def test_scaled_tde_similarity_hand_case():
    human = np.array([[0, 0], [10, 0]], dtype=float)
    model = human + [0, 3]
    # coordinates / 100: k=1 -> 0.03 per point; k=2 -> sqrt(2 * 0.03^2) / 2
    expected = (math.exp(-0.03) + math.exp(-0.03 * math.sqrt(2) / 2)) / 2
    assert scaled_tde_similarity(human, model, (100, 60)) == pytest.approx(expected)
    path = np.random.default_rng(0).uniform(0, 300, (7, 2))
    assert scaled_tde_similarity(path, path, (300, 200)) == pytest.approx(1.0)


def test_sbtde_hand_case():
    human, model = letters_path("abcd"), letters_path("abdc")
    # model windows ab, bd, dc against human ab, bc, cd: 0, 1 (bd~bc), 1 (dc~cd transposed); / k=2
    assert sbtde_distance(human, model, (40, 40), k=2) == pytest.approx(1 / 3)
    assert sbtde_distance(human, model, (40, 40), k=2, reduce="hausdorff") == pytest.approx(0.5)
    assert sbtde_similarity(human, model, (40, 40), k=2) == pytest.approx(2 / 3)
    # k=1: 0; k=2: 1/3; k=3: abd~abc 1, bdc~bcd 1 -> 1/3; k=4: one transposition -> 1/4
    assert sbtde_similarity(human, model, (40, 40), k="all") == pytest.approx((1 + 2 / 3 + 2 / 3 + 3 / 4) / 4)


def test_sbtde_matches_window_loop_with_nltk():
    rng = np.random.default_rng(3)
    size = (640, 480)
    for _ in range(5):
        human, model = rng.uniform(0, 640, (9, 2)) * [1, 0.75], rng.uniform(0, 640, (7, 2)) * [1, 0.75]
        hs, ms = scanpath_to_string(human, size), scanpath_to_string(model, size)
        for k in (1, 3):
            hw = [hs[i : i + k] for i in range(len(hs) - k + 1)]
            nearest = [
                min(edit_distance_nltk(ms[i : i + k], w, transpositions=True) for w in hw) / k
                for i in range(len(ms) - k + 1)
            ]
            assert sbtde_distance(human, model, size, k=k) == pytest.approx(np.mean(nearest))
            assert sbtde_distance(human, model, size, k=k, reduce="hausdorff") == pytest.approx(max(nearest))


def test_scanpath_plausibility_aggregation_and_truncation():
    model = letters_path("abcd")
    humans = [letters_path("abcd"), letters_path("abdc"), letters_path("ab")]  # the last is shorter than k=3
    # model windows ab, bc, cd against abdc's ab, bd, dc: 0, 1, 1 edits -> similarity 1 - (2/2)/3 = 2/3
    assert scanpath_plausibility(model, humans, (40, 40)) == pytest.approx((1.0 + 2 / 3) / 2)
    assert scanpath_plausibility(model, humans, (40, 40), aggregate="max") == 1.0
    # a model path longer than the human: windows da (2 edits) and aa (1 edit) cost without truncation
    long_model = letters_path("abcdaa")
    assert scanpath_plausibility(long_model, [letters_path("abcd")], (40, 40), k=2) == pytest.approx(1 - (1 + 0.5) / 5)
    assert scanpath_plausibility(long_model, [letters_path("abcd")], (40, 40), k=2, truncate_to_human=True) == 1.0
    assert math.isnan(scanpath_plausibility(model, [letters_path("ab")], (40, 40)))


def test_scanpath_plausibility_equals_the_definition_written_out():
    """Against SPP by hand (tests/scanpath_helpers.py: FixaTons' letters, nltk's edit distance), on random
    paths of any length, images whose sides are not multiples of 4, points on and past the border."""
    from tests.scanpath_helpers import spp_by_hand

    rng = np.random.default_rng(7)
    for _ in range(40):
        size = (int(rng.integers(8, 700)), int(rng.integers(8, 500)))
        model = rng.uniform(-0.1, 1.05, (int(rng.integers(1, 12)), 2)) * size
        humans = [rng.uniform(0, 1.02, (int(rng.integers(0, 10)), 2)) * size for _ in range(int(rng.integers(1, 5)))]
        expected = spp_by_hand(model, humans, size)
        got = scanpath_plausibility(model, humans, size)
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)
    human = letters_path("abcd")
    assert spp_by_hand(letters_path("abdc"), [human], (40, 40)) == pytest.approx(2 / 3)  # the hand case above


def test_tde_input_validation():
    ok = np.zeros((4, 2))
    with pytest.raises(InvalidInputError, match="k=5"):
        time_delay_embedding_distance(ok, ok, k=5)
    with pytest.raises(InvalidInputError, match="NaN"):
        time_delay_embedding_distance(ok, np.array([[0, np.nan]] * 4), k=2)
    with pytest.raises(InvalidInputError, match=r"\[T, 2\]"):
        time_delay_embedding_distance(np.zeros((4, 3)), ok)
    with pytest.raises(InvalidInputError, match="reduce"):
        time_delay_embedding_distance(ok, ok, reduce="median")
    with pytest.raises(InvalidInputError, match="needs at least 1"):
        scaled_tde_similarity(np.zeros((0, 2)), ok, (10, 10))
    with pytest.raises(InvalidInputError, match="aggregate"):
        scanpath_plausibility(ok, [ok], (10, 10), aggregate="median")


# --- ScanMatch ------------------------------------------------------------------------------


def test_scanmatch_identical_is_one():
    path = np.random.default_rng(1).uniform(0, 500, (12, 2))
    assert scanmatch(path, path, (500, 500)) == pytest.approx(1.0)


def test_scanmatch_hand_cases():
    size, grid = (20, 10), (1, 2)  # two 10-px bins; threshold 1: same bin 1, neighbour 0
    a, b = [[5, 5], [15, 5]], [[15, 5], [5, 5]]
    assert scanmatch(a, b, size, grid=grid, threshold=1.0) == pytest.approx(1 / 2)
    # points past the border are clamped into the last bin
    assert scanmatch([[25, 5]], [[15, 5]], size, grid=grid, threshold=1.0) == pytest.approx(1.0)
    # bins two apart on a 1x3 grid score threshold - 2
    assert scanmatch([[1, 1]], [[29, 1]], (30, 10), grid=(1, 3), threshold=3.5) == pytest.approx(1.5 / 3.5)
    # temporal bins of 100 ms: a -> [0, 1, 1], b -> [0, 1]; 2 matches / (1 * 3)
    a_t, b_t = [[5, 5, 0.1], [15, 5, 0.2]], [[5, 5, 0.1], [15, 5, 0.1]]
    assert scanmatch(a_t, b_t, size, grid=grid, threshold=1.0, temporal_bin_ms=100) == pytest.approx(2 / 3)
    assert scanmatch(a_t, b_t, size, grid=grid, threshold=1.0) == pytest.approx(1.0)  # durations ignored


def test_scanmatch_takes_max_over_the_dp_matrix():
    # threshold 2: same bin 2, neighbour 1; gap -1 with GazeParser's F[i,0] = gap*(i+1) start.
    # F row 1 = [-2, 1, 0, -1]: the corner is -1 but GazeParser scores max(F) = 1 -> 1 / (2 * 3)
    score = scanmatch([[5, 5]], [[5, 5], [15, 5], [15, 5]], (20, 10), grid=(1, 2), threshold=2.0, gap=-1.0)
    assert score == pytest.approx(1 / 6)


def test_scanmatch_validation():
    with pytest.raises(InvalidInputError, match="durations"):
        scanmatch([[1, 1]], [[1, 1]], (10, 10), temporal_bin_ms=50)
    with pytest.raises(InvalidInputError, match="threshold"):
        scanmatch([[1, 1]], [[1, 1]], (10, 10), threshold=0)
    with pytest.raises(InvalidInputError, match="grid"):
        scanmatch([[1, 1]], [[1, 1]], (10, 10), grid=(0, 2))


# --- MultiMatch ------------------------------------------------------------------------------


def _package_multimatch(a, b, screen, **kw):

    def rec(p):
        p = np.asarray(p, dtype=float)
        dur = p[:, 2] if p.shape[1] == 3 else np.ones(len(p))
        return np.rec.fromarrays([p[:, 0], p[:, 1], dur], names="start_x,start_y,duration")

    return np.asarray(multimatch_gaze.docomparison(rec(a), rec(b), screensize=list(screen), **kw), dtype=float)


def _ours(a, b, screen, **kw):
    return np.array([multimatch(a, b, screen, **kw)[k] for k in MM_KEYS])


@pytest.mark.parametrize("grouping", [False, True])
def test_multimatch_agrees_with_multimatch_gaze(grouping):
    rng = np.random.default_rng(5 + grouping)
    kw_pkg = {"grouping": True, "TDir": 45.0, "TDur": 0.3, "TAmp": 300.0} if grouping else {}
    kw_ours = (
        {"grouping": True, "direction_threshold": 45.0, "duration_threshold": 0.3, "amplitude_threshold": 300.0}
        if grouping
        else {}
    )
    compared = 0
    for _ in range(14):
        la, lb = rng.integers(3, 16, 2)
        a = np.column_stack([rng.uniform(0, 800, la), rng.uniform(0, 600, la), rng.uniform(0.05, 0.5, la)])
        b = np.column_stack([rng.uniform(0, 800, lb), rng.uniform(0, 600, lb), rng.uniform(0.05, 0.5, lb)])
        try:
            ref = _package_multimatch(a, b, (800, 600), **kw_pkg)
        except IndexError:  # the package's lone-short-last-saccade crash; ours keeps that saccade
            continue
        np.testing.assert_allclose(_ours(a, b, (800, 600), **kw_ours), ref, rtol=0, atol=1e-12)
        compared += 1
    assert compared >= 10


def test_multimatch_simplification_changes_the_result():
    rng = np.random.default_rng(11)
    a = np.column_stack([rng.uniform(0, 800, 12), rng.uniform(0, 600, 12), rng.uniform(0.05, 0.5, 12)])
    b = np.column_stack([rng.uniform(0, 800, 12), rng.uniform(0, 600, 12), rng.uniform(0.05, 0.5, 12)])
    plain = _ours(a, b, (800, 600))
    grouped = _ours(
        a, b, (800, 600), grouping=True, direction_threshold=90.0, duration_threshold=1.0, amplitude_threshold=800.0
    )
    assert not np.allclose(plain, grouped)
    # thresholds without grouping=True do nothing, as in the package
    np.testing.assert_array_equal(_ours(a, b, (800, 600), direction_threshold=90.0, duration_threshold=1.0), plain)


def test_multimatch_on_oat_grid_points_agrees_despite_ties():
    layout = OAT_LAYOUTS["amazon"]
    rng = np.random.default_rng(2)
    for _ in range(6):
        a = pad_scanpath(
            objects_to_points(rng.integers(0, 84, rng.integers(1, 12)), layout["grid"], layout["cell_size"])
        )
        b = pad_scanpath(
            objects_to_points(rng.integers(0, 84, rng.integers(1, 12)), layout["grid"], layout["cell_size"])
        )
        np.testing.assert_allclose(
            _ours(a, b, (2560, 1600)), _package_multimatch(a, b, (2560, 1600)), rtol=0, atol=1e-12
        )


def test_multimatch_short_paths_and_identity():
    three = np.array([[10.0, 10.0], [200.0, 50.0], [90.0, 300.0]])
    np.testing.assert_allclose(
        _ours(three, three[::-1], (400, 400)), _package_multimatch(three, three[::-1], (400, 400)), atol=1e-12
    )
    same = multimatch(three, three, (400, 400))
    assert all(same[k] == pytest.approx(1.0) for k in MM_KEYS) and same["mean_without_duration"] == pytest.approx(1.0)
    for n in (1, 2):
        ours = multimatch(three[:n], three, (400, 400))
        assert all(math.isnan(ours[k]) for k in MM_KEYS)
        assert np.isnan(_package_multimatch(three[:n], three, (400, 400))).all()
    with pytest.raises(InvalidInputError, match="NaN"):
        multimatch(np.array([[0, 0], [1, np.nan], [2, 2]]), three, (400, 400))
    with pytest.raises(InvalidInputError, match="needs at least 1"):
        multimatch(np.zeros((0, 2)), three, (400, 400))


def test_mean_without_duration_is_oat_average():
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0, 500, (6, 2)), rng.uniform(0, 500, (5, 2))
    got = multimatch(a, b, (500, 500))
    assert got["mean_without_duration"] == pytest.approx(np.mean([got[k] for k in MM_KEYS[:4]]))
    assert got["duration"] == 1.0  # [T, 2] input: unit durations, as OAT


def test_pad_scanpath_like_oat():
    padded = pad_scanpath([[500.0, 400.0]])
    np.testing.assert_array_equal(padded, [[500, 400, 1], [1, 1, 1], [1, 1, 1]])
    long = np.arange(8.0).reshape(4, 2)
    np.testing.assert_array_equal(pad_scanpath(long), np.column_stack([long, np.ones(4)]))
    np.testing.assert_array_equal(pad_scanpath(np.zeros((0, 2))), np.ones((3, 3)))
    # a padded two-fixation path can be scored (the package returns NaN for the unpadded one)
    two = np.array([[10.0, 10.0], [300.0, 200.0]])
    assert np.isfinite(_ours(pad_scanpath(two), pad_scanpath(two[::-1]), (400, 400))).all()


# --- OAT object-sequence metrics ---------------------------------------------------------------


def test_needleman_wunsch_hand_cases():
    assert needleman_wunsch_score("abc", "abc") == 3
    assert needleman_wunsch_score([1, 2, 3], [1, 3]) == 2
    assert needleman_wunsch_score("ab", "b", mismatch=-1, gap=-1) == 0  # gap, then match
    assert needleman_wunsch_score("ab", "cd", mismatch=-1, gap=-2) == -2  # two mismatches beat four gaps
    assert needleman_wunsch_score("", "abc", gap=-0.5) == -1.5


def test_sequence_score_is_oat_ss():
    assert sequence_score([1, 2, 3], [1, 3]) == pytest.approx(2 / 3)
    assert sequence_score([5, 5, 7], [7, 5, 5, 9]) == pytest.approx(2 / 4)
    assert sequence_score([], [1]) == 0.0
    assert sequence_score(np.array([4.0, 2.0]), torch.tensor([4, 2])) == 1.0
    with pytest.raises(InvalidInputError, match="empty"):
        sequence_score([], [])


def test_search_statistics_hand_case():
    stats = search_statistics([5, 5, 3, 5, 7, 7, 7], target=7)
    # runs 5x2, 3, 5, 7x3: refixations 1 + 2, new objects 5, 3, 7, revisit of 5
    assert stats == pytest.approx(
        {"correct_target": 1.0, "length": 7.0, "search_ratio": 3 / 7, "refixation_ratio": 3 / 7, "revisit_ratio": 1 / 7}
    )
    assert stats["search_ratio"] + stats["refixation_ratio"] + stats["revisit_ratio"] == pytest.approx(1.0)
    assert search_statistics([1, 2], target=7)["correct_target"] == 0.0
    assert tuple(stats) == SEARCH_STATISTICS
    with pytest.raises(InvalidInputError, match="empty"):
        search_statistics([], target=1)
    with pytest.raises(InvalidInputError, match="NaN"):
        search_statistics(np.array([1.0, np.nan]), target=1)


def test_statistics_over_samples_and_delta():
    samples = [[1, 2], [2, 2, 2]]
    got = search_statistics_over_samples(samples, target=2)
    assert got == pytest.approx(
        {
            "correct_target": 1.0,
            "length": 2.5,
            "search_ratio": (1 + 1 / 3) / 2,
            "refixation_ratio": (0 + 2 / 3) / 2,
            "revisit_ratio": 0.0,
        }
    )
    human = {
        "correct_target": 0.5,
        "length": 10.0,
        "search_ratio": 0.5,
        "refixation_ratio": 0.25,
        "revisit_ratio": 0.25,
    }
    model = {"correct_target": 1.0, "length": 5.0, "search_ratio": 0.5, "refixation_ratio": 0.5, "revisit_ratio": 0.0}
    assert behavioural_delta(model, human) == pytest.approx((1.0 + 0.5 + 0.0 + 1.0 + 1.0) / 5)
    assert behavioural_delta(human, human) == 0.0
    # OAT's nansum: 0 vs 0 adds nothing (still divided by 5), anything vs a human 0 is infinite
    zero_revisit = dict(human, revisit_ratio=0.0)
    assert behavioural_delta(dict(human, length=12.0, revisit_ratio=0.0), zero_revisit) == pytest.approx(0.2 / 5)
    assert behavioural_delta(human, zero_revisit) == math.inf
    averaged = average_search_statistics([got, got, human])
    assert averaged["length"] == pytest.approx((2.5 + 2.5 + 10) / 3)
    with pytest.raises(InvalidInputError, match="lack"):
        behavioural_delta({"length": 1.0}, human)


def test_objects_to_points_uses_cell_centres():
    amazon, wine, yogurt = OAT_LAYOUTS["amazon"], OAT_LAYOUTS["wine"], OAT_LAYOUTS["yogurt"]
    np.testing.assert_allclose(
        objects_to_points([0, 15], amazon["grid"], amazon["cell_size"], amazon["offset"]),
        [[91.5, 133.5], [183 + 91.5, 267 + 133.5]],
    )
    np.testing.assert_allclose(
        objects_to_points([12], wine["grid"], wine["cell_size"], wine["offset"]), [[152 + 76, 152 + 449 + 224.5]]
    )
    np.testing.assert_allclose(
        objects_to_points([26], yogurt["grid"], yogurt["cell_size"], yogurt["offset"]),
        [[8 * 186 + 93, 135 + 2 * 305 + 152.5]],
    )
    assert objects_to_points([], (2, 3), (10, 10)).shape == (0, 2)
    with pytest.raises(InvalidInputError, match="EOS"):
        objects_to_points([84], amazon["grid"], amazon["cell_size"])


def test_fixation_nss_binary_map_hand_case():
    size = (4, 3)  # one predicted pixel among 12
    mean, std = 1 / 12, math.sqrt(1 / 12 * 11 / 12)
    assert fixation_nss([[0, 0]], [[0, 0]], size) == pytest.approx((1 - mean) / std)
    # Python/numpy round half to even: 0.5 -> 0, 1.5 -> 2
    assert fixation_nss([[0.5, 0.5]], [[0, 0]], size) == pytest.approx((1 - mean) / std)
    assert fixation_nss([[1.5, 0.5]], [[0, 0]], size) == pytest.approx((0 - mean) / std)
    # predictions past the border are clamped to the last pixel; a repeated GT pixel counts once
    assert fixation_nss([[10, 10]], [[3, 2], [3, 2], [0, 0]], size) == pytest.approx(
        ((1 - mean) / std + (0 - mean) / std) / 2
    )


def test_nss_on_a_saliency_map_against_scipy_zscore():
    rng = np.random.default_rng(9)
    smap = rng.random((30, 40))
    pts = np.array([[3.2, 4.7], [39.0, 29.0], [10.0, 20.0]])
    expected = zscore(smap, axis=None)[[5, 29, 20], [3, 39, 10]].mean()
    assert nss(smap, pts) == pytest.approx(expected)
    assert nss(torch.from_numpy(smap), pts) == pytest.approx(expected)
    assert math.isnan(nss(np.ones((3, 3)), [[1, 1]]))
    with pytest.raises(InvalidInputError, match=r"\[H, W\]"):
        nss(np.ones(5), [[1, 1]])
    with pytest.raises(InvalidInputError, match="needs at least 1"):
        nss(smap, np.zeros((0, 2)))


def test_object_scanpath_scores_per_trial():
    from attnzoo.metrics.scanpath import object_scanpath_scores

    # pred 3 5 5 9 vs human 3 9: NW aligns 3 and 9 (score 2) / max length 4; edit distance: delete 5, 5 = 2
    scores = object_scanpath_scores([3, 5, 5, 9], [3, 9], target=9)
    assert scores["ss"] == 0.5 and scores["edit_distance"] == 2.0
    assert scores["stats"] == {
        "correct_target": 1.0,
        "length": 4.0,
        "search_ratio": 0.75,
        "refixation_ratio": 0.25,
        "revisit_ratio": 0.0,
    }
    empty = object_scanpath_scores([], [3, 9], target=9)
    assert empty == {"ss": 0.0, "edit_distance": 2.0, "stats": None}
