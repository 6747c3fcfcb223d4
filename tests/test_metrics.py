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


# ----------------------------------------------------------------------------- groups (slides, patients)
def naive_group_neighbours(queries, gallery, query_groups, gallery_groups, k):
    """The k most similar gallery rows of each query outside its group, by a plain loop over all pairs."""
    result = []
    for i in range(queries.shape[0]):
        pairs = [(float(queries[i] @ gallery[j]), j) for j in range(gallery.shape[0])
                 if gallery_groups[j] != query_groups[i]]
        result.append([j for _, j in sorted(pairs, key=lambda p: (-p[0], p[1]))[:k]])
    return result


@pytest.mark.parametrize("seed", range(3))
def test_group_exclusion_blockwise_equals_a_naive_loop_and_never_returns_the_querys_group(seed):
    generator = torch.Generator().manual_seed(seed)
    queries = F.normalize(torch.randn(29, 5, generator=generator), dim=1)
    gallery = F.normalize(torch.randn(41, 5, generator=generator), dim=1)
    query_groups = torch.randint(0, 6, (29,), generator=generator)
    gallery_groups = torch.randint(0, 6, (41,), generator=generator)
    scores, indices = topk_similar(queries, gallery, k=9, query_block=4, gallery_block=7,
                                   query_groups=query_groups, gallery_groups=gallery_groups)
    assert not (gallery_groups[indices] == query_groups[:, None]).any()
    assert indices.tolist() == naive_group_neighbours(queries, gallery, query_groups, gallery_groups, 9)
    torch.testing.assert_close(scores, (queries @ gallery.T).gather(1, indices))


def test_a_query_whose_group_fills_most_of_the_gallery_gets_minus_one_where_nothing_is_left():
    images = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.3], [0.0, 1.0]]), dim=1)
    groups = torch.tensor([0, 0, 0, 1])
    scores, indices = topk_similar(images, images, k=3, exclude=torch.arange(4), query_groups=groups,
                                   gallery_groups=groups, gallery_block=2)
    assert indices[0].tolist() == [3, -1, -1] and math.isinf(scores[0, 1]) and scores[0, 1] < 0
    assert indices[3].tolist() == [2, 1, 0]  # nearest to (0, 1) first


def test_leave_one_out_with_groups_hand_example():
    # Images 0 and 1 share a slide; so do 2 and 3. Image 1's best match outside its slide is 2 (class 1).
    embeddings = F.normalize(torch.tensor([[1.0, 0.0], [0.95, 0.3], [0.7, 0.7], [0.0, 1.0], [0.9, -0.2]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 0])
    result = retrieval_metrics(embeddings, labels, query_groups=[0, 0, 1, 1, 2])
    np.testing.assert_array_equal(result["predicted"], [0, 1, 0, 0, 0])
    assert result["eta_p"] == pytest.approx(2 / 5)
    # Relevant items outside the query's slide: 0 -> {4}; 1 -> {4}; 2 -> none; 3 -> none; 4 -> {0, 1}.
    assert result["num_lone_queries"] == 2
    # Query 0 ranks 4 first (AP 1); query 1 ranks 2 first (AP 0); query 4 ranks 0, 1 first (AP 1).
    assert result["map@r"] == pytest.approx(2 / 3)
    assert result["recall@1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("gallery_side", [False, True])
def test_one_group_per_image_gives_exactly_the_papers_numbers(gallery_side):
    generator = torch.Generator().manual_seed(3)
    queries = F.normalize(torch.randn(40, 6, generator=generator), dim=1)
    labels = torch.randint(0, 4, (40,), generator=generator)
    if gallery_side:  # the train protocol: groups on both sides, none shared
        gallery = F.normalize(torch.randn(33, 6, generator=generator), dim=1)
        gallery_labels = torch.randint(0, 4, (33,), generator=generator)
        plain = retrieval_metrics(queries, labels, gallery, gallery_labels, num_classes=4)
        grouped = retrieval_metrics(queries, labels, gallery, gallery_labels, num_classes=4,
                                    query_groups=torch.arange(40), gallery_groups=torch.arange(40, 73))
    else:
        plain = retrieval_metrics(queries, labels, num_classes=4, query_block=7, gallery_block=9)
        grouped = retrieval_metrics(queries, labels, num_classes=4, query_block=7, gallery_block=9,
                                    query_groups=torch.arange(40))
    for key in ("eta_p", "eta_w", "eta_total", "map@r", "num_lone_queries", "num_gallery",
                *(f"recall@{k}" for k in (1, 2, 4, 8))):
        assert grouped[key] == plain[key], key
    np.testing.assert_array_equal(grouped["predicted"], plain["predicted"])
    np.testing.assert_array_equal(grouped["confusion"], plain["confusion"])


def test_one_group_per_class_leaves_no_neighbour_of_the_querys_class():
    generator = torch.Generator().manual_seed(4)
    embeddings = F.normalize(torch.randn(30, 4, generator=generator), dim=1)
    labels = torch.arange(30) % 3
    result = retrieval_metrics(embeddings, labels, query_groups=labels + 10)
    assert result["eta_p"] == 0.0 and result["eta_w"] == 0.0
    assert result["num_lone_queries"] == 30 and math.isnan(result["map@r"])


def test_groups_on_one_side_only_or_a_group_holding_the_whole_gallery_are_refused():
    images = F.normalize(torch.randn(4, 3), dim=1)
    with pytest.raises(ValueError, match="groups of both the queries and the gallery"):
        retrieval_metrics(images, [0, 1, 0, 1], images, [0, 1, 0, 1], query_groups=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="query 0: every gallery item is of its own group"):
        retrieval_metrics(images, [0, 1, 0, 1], query_groups=[5, 5, 5, 5])
