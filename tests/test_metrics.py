"""Kimia Path24 accuracies, Recall@K, mAP@R and the blockwise ranking, against hand-computed values."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histo_retrieval.evaluation.metrics import combine_learners, kimia_accuracy, map_at_r, recall_at_k, retrieval_metrics, topk_similar


def test_kimia_accuracy_hand_example_with_unpredicted_class_and_single_image_class():
    # Class 2 has one test image, predicted wrong, and no query is ever predicted as class 2.
    true = [0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 1, 1, 0, 0]
    result = kimia_accuracy(true, predicted)
    np.testing.assert_array_equal(result["confusion"], [[2, 1, 0], [1, 1, 0], [1, 0, 0]])
    assert result["correct"] == 3 and result["num_queries"] == 6
    assert result["eta_p"] == pytest.approx(0.5)
    # Mean per-class recall (row sums): (2/3 + 1/2 + 0) / 3; column sums would divide 0 by 0 for class 2.
    assert result["eta_w"] == pytest.approx(7 / 18)
    assert result["eta_total"] == pytest.approx(0.5 * 7 / 18)
    np.testing.assert_allclose(result["per_class_recall"], [2 / 3, 1 / 2, 0])


def test_kimia_accuracy_leaves_classes_without_queries_out_of_eta_w():
    result = kimia_accuracy([0, 1, 1], [0, 1, 0], num_classes=4)
    assert result["confusion"].shape == (4, 4)
    assert result["eta_w"] == pytest.approx((1 + 0.5) / 2)
    assert np.isnan(result["per_class_recall"][2]) and np.isnan(result["per_class_recall"][3])


def test_kimia_accuracy_rejects_mismatched_lengths_and_labels_outside_the_classes():
    with pytest.raises(ValueError, match="3 true labels but 2 predicted"):
        kimia_accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match=r"labels must lie in 0 \.\. 2"):
        kimia_accuracy([0, 1, 3], [0, 1, 1], num_classes=3)


@pytest.mark.parametrize("seed", range(5))
def test_eta_w_is_balanced_accuracy_and_the_confusion_matrix_counts_pairs(seed):
    """On random predictions, with a class that has queries but is never predicted: eta_W equals
    scikit-learn's balanced_accuracy_score, and each cell counts its (true, predicted) pairs."""
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(seed)
    true = rng.integers(0, 6, 200)
    predicted = rng.integers(0, 6, 200)
    predicted[predicted == 4] = 2  # class 4 is never predicted
    result = kimia_accuracy(true, predicted, num_classes=6)
    assert result["eta_w"] == pytest.approx(balanced_accuracy_score(true, predicted), abs=1e-12)
    assert result["eta_p"] == pytest.approx(np.mean(true == predicted), abs=1e-12)
    counted = np.zeros((6, 6), dtype=np.int64)
    for t, p in zip(true, predicted):
        counted[t, p] += 1
    np.testing.assert_array_equal(result["confusion"], counted)
    assert result["confusion"].dtype == np.int64 and result["per_class_recall"][4] == 0


def test_recall_at_k_and_map_at_r_hand_example():
    query_labels = torch.tensor([0, 1, 2])
    neighbour_labels = torch.tensor([[1, 0, 0, 1], [1, 1, 0, 0], [0, 1, 0, 1]])
    num_relevant = torch.tensor([2, 3, 0])  # the class-2 query is alone: left out of both metrics
    recall = recall_at_k(query_labels, neighbour_labels, num_relevant, ks=(1, 2, 4))
    assert recall == {"recall@1": pytest.approx(0.5), "recall@2": pytest.approx(1.0), "recall@4": pytest.approx(1.0)}
    # query 0: top R=2 relevance [0, 1] -> (1/2) / 2; query 1: top R=3 relevance [1, 1, 0] -> (1 + 1) / 3.
    assert map_at_r(query_labels, neighbour_labels, num_relevant) == pytest.approx((0.25 + 2 / 3) / 2)


def test_map_at_r_needs_r_neighbours():
    with pytest.raises(ValueError, match="needs 3 neighbours"):
        map_at_r(torch.tensor([0]), torch.tensor([[0, 0]]), torch.tensor([3]))


def test_combine_learners_inner_product_is_mean_cosine_over_learners():
    generator = torch.Generator().manual_seed(0)
    a = [torch.randn(5, 8, generator=generator) for _ in range(3)]
    b = [torch.randn(4, 8, generator=generator) for _ in range(3)]
    expected = sum(F.normalize(x, dim=1) @ F.normalize(y, dim=1).T for x, y in zip(a, b)) / 3
    torch.testing.assert_close(combine_learners(a) @ combine_learners(b).T, expected)
    assert combine_learners(a[0]).shape == (5, 8)


def test_blockwise_topk_equals_full_ranking():
    generator = torch.Generator().manual_seed(1)
    queries = F.normalize(torch.randn(23, 6, generator=generator), dim=1)
    gallery = F.normalize(torch.randn(37, 6, generator=generator), dim=1)
    scores, indices = topk_similar(queries, gallery, k=7, query_block=4, gallery_block=5)
    full_scores, full_indices = (queries @ gallery.T).topk(7, dim=1)
    torch.testing.assert_close(scores, full_scores)
    torch.testing.assert_close(indices, full_indices)


def test_leave_one_out_never_returns_the_query_even_for_identical_images():
    images = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.6, 0.8]]), dim=1)
    exclude = torch.arange(5)
    _, indices = topk_similar(images, images, k=4, exclude=exclude, gallery_block=2)
    assert not (indices == exclude[:, None]).any()
    assert indices[0, 0] == 1 and indices[1, 0] == 0 and indices[2, 0] == 3 and indices[3, 0] == 2
    # Identical twins of different classes: each predicts the other's class, never its own.
    result = retrieval_metrics(images[:2], torch.tensor([0, 1]))
    np.testing.assert_array_equal(result["predicted"], [1, 0])
    assert result["eta_p"] == 0.0


def test_topk_rejects_k_beyond_reachable_items():
    with pytest.raises(ValueError, match="between 1 and the 2 gallery items"):
        topk_similar(torch.ones(3, 2), torch.ones(3, 2), k=3, exclude=torch.arange(3))


def test_retrieval_metrics_leave_one_out_hand_example():
    # Two tight clusters; image 2 (class 0) sits inside class 1's cluster; class 2 has one image.
    embeddings = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.1, 1.0, 0.0],
                                           [0.0, 1.0, 0.05], [0.05, 0.98, 0.0], [0.0, 0.2, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    result = retrieval_metrics(embeddings, labels)
    np.testing.assert_array_equal(result["predicted"], [0, 0, 1, 1, 0, 1])
    assert result["eta_p"] == pytest.approx(3 / 6)
    assert result["eta_w"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert result["num_lone_queries"] == 1 and result["num_gallery"] == 6
    assert result["recall@1"] == pytest.approx(3 / 5)
    # Query 2 (R=2) ranks 4 and 3 (class 1) first -> AP 0; query 4 (R=1) ranks 2 (class 0) first -> AP 0;
    # queries 0, 1 and 3 find all their relevant items first -> AP 1.
    assert result["map@r"] == pytest.approx(3 / 5)


def test_retrieval_metrics_against_a_separate_gallery():
    queries = F.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0]]), dim=1)
    gallery = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]), dim=1)
    result = retrieval_metrics(queries, [0, 1], gallery, [1, 1, 0], num_classes=2)
    np.testing.assert_array_equal(result["predicted"], [1, 1])
    assert result["eta_p"] == pytest.approx(0.5)
    assert result["recall@2"] == pytest.approx(1.0)
    # Query 0 (R=1): its match is second, outside the top R -> AP 0; query 1 (R=2): hit, miss -> AP 1/2.
    assert result["map@r"] == pytest.approx((0 + 0.5) / 2)
    assert not math.isnan(result["eta_total"])
