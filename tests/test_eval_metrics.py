"""The evaluation metrics against reference values: revisitop mAP / mP@k, OpenOOD and knn-ood OOD metrics,
KNN OOD scores, DINO kNN votes and linear CKA (the anchors of /work/shared/references/evaluation.md, each
computed there by running the reference code)."""

import builtins
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distillery.errors import DistilleryError
from distillery.evaluate.cka import cka_matrix, linear_cka, plot_cka_heatmap, rank_teacher_pairs
from distillery.evaluate.knn import knn_scores
from distillery.evaluate.ood import group_means, knn_ood_scores, ood_metrics
from distillery.evaluate.retrieval import (crop_box, load_data_pickle, load_ground_truth, rank_database,
                                           revisited_map)

IDENTITY_10 = np.arange(10)[:, None]  # one query whose ranking is database items 0..9 in order


# ---------------------------------------------------------------- retrieval: revisitop's compute_map anchors

def test_positives_with_junk_give_revisitop_ap_and_precisions():
    result = revisited_map(IDENTITY_10, [{"easy": [1, 4, 7], "hard": [], "junk": [2]}])["medium"]
    assert result["map"] == pytest.approx(0.349206, abs=1e-6)
    # P@10 is 3/7: k is cut to the position of the last positive once the junk is removed
    assert result["mp"] == pytest.approx([0.0, 0.4, 0.428571], abs=1e-6)


def test_medium_and_hard_protocols_split_easy_and_hard_positives():
    result = revisited_map(IDENTITY_10, [{"easy": [1], "hard": [4, 7], "junk": [2]}])
    assert result["medium"]["map"] == pytest.approx(0.349206, abs=1e-6)
    assert result["hard"]["map"] == pytest.approx(0.216667, abs=1e-6)


def test_single_positive_at_second_place_scores_a_quarter_not_sklearns_half():
    assert revisited_map(np.arange(3)[:, None], [{"easy": [1], "hard": [], "junk": []}])["medium"]["map"] == 0.25


@pytest.mark.parametrize("gnd, column", [({"easy": [1], "hard": [], "junk": [0]}, [0, 1, 2]),  # junk, positive
                                         ({"easy": [0, 1, 2], "hard": [], "junk": []}, [2, 0, 1, 3])])
def test_positives_first_once_junk_is_removed_score_one(gnd, column):
    result = revisited_map(np.array(column)[:, None], [gnd])["medium"]
    assert result["map"] == 1.0 and result["mp"] == [1.0, 1.0, 1.0]


def test_query_without_positives_is_left_out_of_both_means():
    gnd = [{"easy": [1, 4, 7], "hard": [], "junk": [2]}, {"easy": [], "hard": [], "junk": [0]}]
    result = revisited_map(np.repeat(IDENTITY_10, 2, axis=1), gnd)
    assert result["medium"]["map"] == pytest.approx(0.349206, abs=1e-6)
    assert result["medium"]["mp"] == pytest.approx([0.0, 0.4, 0.428571], abs=1e-6)
    assert result["medium"]["aps"][1] is None
    assert np.isnan(result["hard"]["map"])  # no query has a hard positive


def test_ranks_must_have_one_column_per_query():
    with pytest.raises(DistilleryError, match="2 queries"):
        revisited_map(IDENTITY_10, [{"easy": [1], "hard": [], "junk": []}] * 2)


def test_rank_database_orders_by_cosine_similarity_with_stable_ties():
    database = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    ranks = rank_database(np.array([[3.0, 0.0], [0.0, 1.0]]), database)
    assert ranks.shape == (4, 2)
    assert ranks[:, 0].tolist() == [1, 3, 2, 0]
    assert ranks[:, 1].tolist() == [0, 2, 1, 3]


@pytest.mark.parametrize("box, size", [((2.4, 1.6, 7.5, 20), (6, 6)),  # rounded, then clipped to 10 x 8
                                       ((5, 5, 5, 5), (1, 1)),  # empty box: still 1 px
                                       ((20, 20, 30, 30), (1, 1))])  # outside the image
def test_crop_box_rounds_clips_and_keeps_a_pixel(box, size):
    assert crop_box(Image.new("RGB", (10, 8)), box).size == size


# ---------------------------------------------------------------- retrieval: reading the ground truth safely

class _Exploit:
    """Unpickling this calls `function(argument)`, the way a malicious gnd file would."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("function, argument, named", [
    (os.system, "touch {marker}", "system"),
    (builtins.eval, "open({marker!r}, 'w')", "builtins.eval"),
    (subprocess.call, ["touch", "{marker}"], "subprocess.call"),
])
def test_pickle_that_calls_a_function_is_refused_before_the_call(tmp_path, function, argument, named):
    marker = tmp_path / "called"
    argument = [a.format(marker=marker) for a in argument] if isinstance(argument, list) else \
        argument.format(marker=str(marker))
    path = tmp_path / "gnd_synth.pkl"
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": [], "gnd": _Exploit(function, argument)}))
    with pytest.raises(DistilleryError, match=rf"gnd_synth\.pkl: refused .*{named}"):
        load_data_pickle(path)
    assert not marker.exists()


def _write_set(root, imlist=("db0", "db1", "db2"), qimlist=("q0", "q1"), gnd=None, protocol=4, images=None):
    """A 3-image database and 2 queries as gnd_roxford5k.pkl + jpg/ in `root`; `images` names the jpgs written."""
    gnd = gnd if gnd is not None else [
        {"easy": np.array([0], np.int64), "hard": np.array([1, 2]), "junk": np.array([], np.int64),
         "bbx": np.array([1.0, 1.0, 6.0, 5.0])},
        {"easy": [2], "hard": [], "junk": [0], "bbx": [0, 0, 8, 8]}]
    root.mkdir(parents=True, exist_ok=True)
    (root / "jpg").mkdir(exist_ok=True)
    for name in (list(imlist) + list(qimlist)) if images is None else images:
        Image.new("RGB", (8, 8)).save(root / "jpg" / f"{name}.jpg")
    with open(root / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": list(imlist), "qimlist": list(qimlist), "gnd": gnd}, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 5])
def test_ground_truth_with_numpy_arrays_loads(tmp_path, protocol):
    _write_set(tmp_path / "data", protocol=protocol)
    retrieval_set = load_ground_truth(tmp_path / "data", "roxford")
    assert retrieval_set.name == "roxford5k"
    assert retrieval_set.gnd[0]["hard"].tolist() == [1, 2] and retrieval_set.gnd[1]["junk"].tolist() == [0]
    assert retrieval_set.query_boxes == [(1.0, 1.0, 6.0, 5.0), (0.0, 0.0, 8.0, 8.0)]
    assert [p.name for p in retrieval_set.database_paths] == ["db0.jpg", "db1.jpg", "db2.jpg"]
    assert all(p.is_file() for p in retrieval_set.query_paths)


def test_ground_truth_is_found_in_revisitops_per_dataset_folder(tmp_path):
    _write_set(tmp_path / "roxford5k")
    assert load_ground_truth(tmp_path, "roxford5k").root == tmp_path / "roxford5k"


@pytest.mark.parametrize("change, message", [
    ({"gnd": [{"easy": [0], "hard": [], "junk": [], "bbx": [0, 0, 1, 1]}]}, "gnd has 1 entries for 2 queries"),
    ({"gnd": [{"easy": [0], "hard": [], "junk": []}] * 2}, r"gnd\[0\] \(q0\) has no bbx"),
    ({"gnd": [{"easy": [3], "hard": [], "junk": [], "bbx": [0, 0, 1, 1]}] * 2}, "lists index 3, but imlist has 3"),
    ({"images": ["db0", "q0", "q1"]}, "2 of 5 images are missing, the first is db1.jpg"),
])
def test_broken_ground_truth_is_one_clear_error(tmp_path, change, message):
    _write_set(tmp_path / "data", **change)
    with pytest.raises(DistilleryError, match=message):
        load_ground_truth(tmp_path / "data", "roxford")


def test_missing_ground_truth_and_unknown_dataset_are_named(tmp_path):
    with pytest.raises(DistilleryError, match="gnd_rparis6k.pkl: no such file"):
        load_ground_truth(tmp_path, "rparis")
    with pytest.raises(DistilleryError, match="unknown retrieval dataset 'oxford'"):
        load_ground_truth(tmp_path, "oxford")


def test_synthetic_retrieval_set_loads_and_a_perfect_ranking_scores_one(tmp_path):
    from distillery.data.synth import SynthConfig, generate

    generate(SynthConfig(train=0, val=0, ood_near=0, ood_far=0, landmarks=2, distractors=3, workers=1), tmp_path / "d")
    retrieval_set = load_ground_truth(tmp_path / "d" / "retrieval", "synth")
    assert len(retrieval_set.qimlist) == 4 and len(retrieval_set.imlist) == 2 * 10 + 3
    # easy, then hard, then junk, then the rest: perfect for Medium, and for Hard once easy counts as junk
    columns = []
    for entry in retrieval_set.gnd:
        first = np.concatenate([entry["easy"], entry["hard"], entry["junk"]])
        columns.append(np.concatenate([first, np.setdiff1d(np.arange(len(retrieval_set.imlist)), first)]))
    result = revisited_map(np.stack(columns, axis=1), retrieval_set.gnd)
    assert result["medium"]["map"] == 1.0 and result["hard"]["map"] == 1.0


def test_a_colour_histogram_does_not_solve_the_synth_retrieval_set(synth_dir, tmp_path):
    """The floor the demo sets models against: views change colour balance, so colour finds few landmarks."""
    script = Path(__file__).parents[1] / "benchmarks" / "retrieval_colour_baseline.py"
    out = tmp_path / "colour.json"
    subprocess.run([sys.executable, str(script), "--data-root", str(synth_dir / "retrieval"), "--out", str(out)],
                   check=True, capture_output=True)
    result = json.loads(out.read_text())
    # chance is about 8 positives in 56 database images; hue-rotated views defeat a colour descriptor
    assert result["medium"]["map"] < 50 and result["medium"]["mp@1,5,10"][0] < 100.0
    assert 0 < result["hard"]["map"] <= result["medium"]["map"]


# ---------------------------------------------------------------- OOD

def test_ood_metrics_match_openood_and_knn_ood_on_reference_scores():
    rng = np.random.default_rng(0)
    id_scores, ood_scores = rng.normal(1, 1, 2000), rng.normal(0, 1.3, 3000)
    result = ood_metrics(id_scores, ood_scores)
    assert result == pytest.approx({"auroc": 0.7216, "aupr_in": 0.5685, "aupr_out": 0.8116,
                                    "fpr95_id_tpr": 0.6830, "fpr95_ood_tpr": 0.8785}, abs=5e-5)


def test_separated_scores_are_perfect():
    result = ood_metrics([2.0, 3.0, 4.0, 5.0], [-1.0, 0.0, 1.0])
    assert result == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95_id_tpr": 0.0, "fpr95_ood_tpr": 0.0}


def test_knn_ood_score_is_minus_the_distance_to_the_kth_normalised_neighbour():
    train = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])  # unit vectors (1,0), (0,1), (-1,0) once normalised
    test = np.array([[0.6, 0.8], [3.0, 4.0]])  # both (0.6, 0.8): similarities 0.8, 0.6, -0.6
    for k, distance in ((1, np.sqrt(2 - 1.6)), (2, np.sqrt(2 - 1.2)), (3, np.sqrt(2 + 1.2))):
        np.testing.assert_allclose(knn_ood_scores(train, test, k), [-distance] * 2, atol=1e-6)


def test_knn_ood_on_a_train_fraction_is_seeded():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    test = np.array([[0.6, 0.8]])
    half = knn_ood_scores(train, test, k=2, train_fraction=0.5, seed=3)
    assert np.array_equal(half, knn_ood_scores(train, test, k=2, train_fraction=0.5, seed=3))
    # the farther of 2 kept neighbours: among the distances to the 4 unit vectors, never the nearest one
    candidates = -np.sqrt(2 - 2 * np.array([0.6, -0.6, -0.8]))
    assert np.isclose(half[0], candidates, atol=1e-6).any()
    with pytest.raises(DistilleryError, match="k=3"):
        knn_ood_scores(train, test, k=3, train_fraction=0.5)


def test_group_means_average_each_metric_over_the_groups_sets():
    per_set = {"a": {"auroc": 0.9, "fpr95_id_tpr": 0.2}, "b": {"auroc": 0.7, "fpr95_id_tpr": 0.4},
               "c": {"auroc": 0.5, "fpr95_id_tpr": 1.0}}
    result = group_means(per_set, {"near": ["a", "b"], "far": ["c"], "none": []})
    assert list(result) == ["near", "far"]
    assert result["near"] == pytest.approx({"auroc": 0.8, "fpr95_id_tpr": 0.3})
    assert result["far"] == {"auroc": 0.5, "fpr95_id_tpr": 1.0}
    with pytest.raises(DistilleryError, match="'d'"):
        group_means(per_set, {"far": ["d"]})


# ---------------------------------------------------------------- kNN classifier (DINO)

def test_knn_votes_are_sums_of_exp_similarity_over_temperature():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = np.array([0, 1, 1])
    test = np.array([[1.0, 0.0], [0.0, 2.0]])
    scores = knn_scores(train, labels, test, k=2)
    expected = [[np.exp(1 / 0.07), np.exp(0.6 / 0.07)], [0.0, np.exp(1 / 0.07) + np.exp(0.8 / 0.07)]]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


# ---------------------------------------------------------------- CKA

@pytest.fixture
def cka_reference():
    np.random.seed(1337)  # the legacy generator: these anchors are stable across numpy versions
    x = np.random.randn(100, 10)
    return x, np.random.randn(100, 10) + x


def test_cka_matches_the_reference_values(cka_reference):
    x, y = cka_reference
    assert linear_cka(x, y) == pytest.approx(0.5576132566, abs=1e-9)
    assert linear_cka(x, y, debiased=True) == pytest.approx(0.5134564895, abs=1e-9)


def _unbiased_hsic(k, l):
    """Song et al. 2012's U-statistic, written on n x n Gram matrices (independent of cka.py's feature form)."""
    n = len(k)
    k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    return (np.sum(k * l) + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * k.sum(0) @ l.sum(0)) / (n * (n - 3))


def test_feature_space_cka_equals_the_gram_matrix_definitions(cka_reference):
    x, y = cka_reference
    y = y[:, :7]  # the two sets may differ in width
    centring = np.eye(100) - 1 / 100
    k, l = centring @ x @ x.T @ centring, centring @ y @ y.T @ centring
    assert linear_cka(x, y) == pytest.approx(np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)), abs=1e-12)
    k, l = x @ x.T, y @ y.T  # uncentred: the U-statistic does not need centring
    expected = _unbiased_hsic(k, l) / np.sqrt(_unbiased_hsic(k, k) * _unbiased_hsic(l, l))
    assert linear_cka(x, y, debiased=True) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_one_on_itself_and_invariant_to_rotation_and_scale(cka_reference, debiased):
    x, y = cka_reference
    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(10, 10)))
    assert linear_cka(x, x, debiased) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(3.7 * x @ rotation + 5.0, y, debiased) == pytest.approx(linear_cka(x, y, debiased), abs=1e-12)
    stretch = np.diag(np.arange(1.0, 11.0))  # not orthogonal: CKA changes
    assert abs(linear_cka(x @ stretch, y, debiased) - linear_cka(x, y, debiased)) > 1e-3


def test_cka_matrix_plot_and_teacher_pairs(cka_reference, tmp_path):
    x, y = cka_reference
    names, matrix = cka_matrix({"a": x, "b": y, "c": x[:, :5]})
    assert names == ["a", "b", "c"]
    assert np.allclose(np.diag(matrix), 1.0) and np.array_equal(matrix, matrix.T)
    assert matrix[0, 1] == pytest.approx(linear_cka(x, y), abs=1e-12)
    path = plot_cka_heatmap(names, matrix, tmp_path / "plots" / "cka.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pairs = rank_teacher_pairs(["a", "b", "c"], np.array([[1.0, 0.45, 0.9], [0.45, 1.0, 0.62], [0.9, 0.62, 1.0]]))
    assert [(p["pair"], p["near_target"]) for p in pairs] == [(("a", "b"), True), (("b", "c"), False),
                                                              (("a", "c"), False)]


def test_cka_needs_the_same_samples():
    with pytest.raises(DistilleryError, match="100 and 90 rows"):
        linear_cka(np.ones((100, 3)), np.ones((90, 3)))
