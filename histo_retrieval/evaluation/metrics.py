"""Kimia Path24 accuracies, retrieval metrics and blockwise similarity ranking.

Definitions (docs/reproduction.md, "Metrics"; Babaie et al. CVPRW 2017):
- eta_p: share of queries whose nearest neighbour has the query's class (patch-to-scan accuracy).
- eta_W: mean over classes of C_cc / sum_k C_ck with C the confusion matrix (rows true, columns
  predicted; scikit-learn's confusion_matrix), i.e. the mean per-class recall, like the reference
  code and the official MATLAB script, and scikit-learn's balanced_accuracy_score (the official
  Python script divides by column sums instead).
- eta_total = eta_p * eta_W.
- Recall@K: share of queries with at least one neighbour of their class among the K most similar
  (Song et al. CVPR 2016).
- mAP@R: as pytorch-metric-learning defines it (Musgrave et al. ECCV 2020): for a query with R
  relevant gallery items, (1/R) * sum over the top R neighbours i of precision@i * relevant(i).
Recall@K and mAP@R leave out queries that have no relevant item in the gallery ("lone" queries,
as pytorch-metric-learning does); eta_p and eta_W count every query.
With groups (slides or patients; docs/reproduction.md, "Protocols that respect slides"), no gallery
item of the query's group is a neighbour or counts as relevant; the mask is built block by block.

Similarity of two images under a model with M learners is the mean over learners of their cosine
similarities. `combine_learners` turns the M embeddings into one vector per image whose inner
products are exactly that mean, so one matrix product (or one faiss inner-product index) ranks.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

RECALL_KS = (1, 2, 4, 8)


def combine_learners(embeddings: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """n x (M*d) float32 rows whose inner products are the mean over the M learners of the cosines.

    Args:
        embeddings: a list of M tensors n x d (one per learner), or a single n x d tensor (M = 1).
    """
    if isinstance(embeddings, torch.Tensor):
        embeddings = [embeddings]
    # Re-normalising in float32 keeps the similarity a cosine even when the model ran under autocast.
    parts = [F.normalize(e.float(), dim=1) for e in embeddings]
    return torch.cat(parts, dim=1) / len(parts) ** 0.5


def topk_similar(queries: torch.Tensor, gallery: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
                 query_block: int = 1024, gallery_block: int = 16384, query_groups: torch.Tensor | None = None,
                 gallery_groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k gallery rows most similar (inner product) to each query, most similar first.

    Memory stays at query_block x (gallery_block + k) scores, whatever the gallery size (the group
    mask too is built block by block, never n_q x n_g).

    Args:
        queries: n_q x D.
        gallery: n_g x D.
        k: neighbours per query (at most the number of gallery rows a query can reach).
        exclude: n_q gallery indices, one per query, never returned for that query (-1: none);
            used to drop the query itself by index, so identical images do not confuse it.
        query_block, gallery_block: block sizes of the ranking.
        query_groups, gallery_groups: n_q and n_g integer group codes (a slide or a patient, the same
            code for the same group on both sides), both or neither: a gallery row of the query's
            group is never returned for it. A query that reaches fewer than k rows gets score -inf
            and index -1 in the places it cannot fill.
    Returns:
        (scores n_q x k float32, indices n_q x k int64).
    """
    num_queries, num_gallery = queries.shape[0], gallery.shape[0]
    if (query_groups is None) != (gallery_groups is None):
        raise ValueError("pass the groups of both the queries and the gallery, or neither")
    grouped = query_groups is not None
    reachable = num_gallery - (1 if exclude is not None and num_gallery > 0 else 0)
    if not 0 < k <= reachable:
        raise ValueError(f"k={k} must be between 1 and the {reachable} gallery items a query can reach")
    scores = torch.empty(num_queries, k, dtype=torch.float32, device=queries.device)
    indices = torch.empty(num_queries, k, dtype=torch.long, device=queries.device)
    for q0 in range(0, num_queries, query_block):
        q = queries[q0:q0 + query_block].float()
        best_scores = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
        best_indices = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        for g0 in range(0, num_gallery, gallery_block):
            block = q @ gallery[g0:g0 + gallery_block].float().T
            if exclude is not None:
                local = exclude[q0:q0 + query_block].to(q.device) - g0
                inside = (local >= 0) & (local < block.shape[1])
                rows = inside.nonzero().squeeze(1)
                block[rows, local[rows]] = float("-inf")
            if grouped:
                same = query_groups[q0:q0 + query_block, None] == gallery_groups[None, g0:g0 + gallery_block]
                block.masked_fill_(same, float("-inf"))
            block_scores, block_indices = block.topk(min(k, block.shape[1]), dim=1)
            merged_scores = torch.cat([best_scores, block_scores], dim=1)
            merged_indices = torch.cat([best_indices, block_indices + g0], dim=1)
            best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
            best_indices = merged_indices.gather(1, order)
        scores[q0:q0 + query_block] = best_scores
        indices[q0:q0 + query_block] = best_indices
    if grouped:  # places a query could not fill hold an excluded row: say so instead
        indices[scores == float("-inf")] = -1
    return scores, indices


def kimia_accuracy(true_labels: Sequence[int] | np.ndarray | torch.Tensor,
                   predicted_labels: Sequence[int] | np.ndarray | torch.Tensor,
                   num_classes: int | None = None) -> dict:
    """eta_p, eta_W, eta_total and the confusion matrix of nearest-neighbour predictions.

    Args:
        true_labels: class index of every query.
        predicted_labels: class index predicted for every query (its nearest neighbour's class).
        num_classes: size of the confusion matrix (default: 1 + the largest label seen). Classes
            without a query (empty rows) have no recall and are left out of eta_W's mean.
    Returns:
        {"eta_p", "eta_w", "eta_total": float, "correct", "num_queries": int,
         "confusion": int64 array (rows true, columns predicted), "per_class_recall": float array,
         NaN for a class without queries}.
    """
    true = np.asarray(true_labels, dtype=np.int64).reshape(-1)
    predicted = np.asarray(predicted_labels, dtype=np.int64).reshape(-1)
    if true.shape != predicted.shape:
        raise ValueError(f"{true.size} true labels but {predicted.size} predicted labels")
    if true.size == 0:
        raise ValueError("no queries to score")
    if num_classes is None:
        num_classes = int(max(true.max(), predicted.max())) + 1
    if min(true.min(), predicted.min()) < 0 or max(true.max(), predicted.max()) >= num_classes:
        # scikit-learn would silently drop such queries from the matrix.
        raise ValueError(f"labels must lie in 0 .. {num_classes - 1}")
    from sklearn.metrics import confusion_matrix  # imported here: a second of start-up retrieve.py never needs

    confusion = confusion_matrix(true, predicted, labels=np.arange(num_classes)).astype(np.int64)
    row_sums = confusion.sum(axis=1)
    per_class_recall = np.full(num_classes, np.nan)
    present = row_sums > 0
    per_class_recall[present] = np.diag(confusion)[present] / row_sums[present]
    correct = int(np.trace(confusion))
    eta_p = correct / true.size
    eta_w = float(per_class_recall[present].mean())
    return {"eta_p": eta_p, "eta_w": eta_w, "eta_total": eta_p * eta_w, "correct": correct,
            "num_queries": int(true.size), "confusion": confusion, "per_class_recall": per_class_recall}


def recall_at_k(query_labels: torch.Tensor, neighbour_labels: torch.Tensor, num_relevant: torch.Tensor,
                ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@K over the queries that have at least one relevant gallery item.

    Args:
        query_labels: n_q class indices.
        neighbour_labels: n_q x k class indices of the neighbours, most similar first.
        num_relevant: n_q counts of gallery items sharing the query's class (the query excluded).
    Returns:
        {"recall@K": float} for each K (K larger than k is clipped to k).
    """
    hits = neighbour_labels == query_labels[:, None]
    scored = num_relevant > 0
    return {f"recall@{k}": _mean(hits[scored, :k].any(dim=1)) for k in ks}


def map_at_r(query_labels: torch.Tensor, neighbour_labels: torch.Tensor, num_relevant: torch.Tensor) -> float:
    """mAP@R (pytorch-metric-learning's mean_average_precision_at_r) over non-lone queries.

    Args:
        query_labels: n_q class indices.
        neighbour_labels: n_q x k class indices of the neighbours, most similar first, with
            k >= the largest num_relevant.
        num_relevant: n_q counts R of gallery items sharing the query's class (the query excluded).
    """
    k = neighbour_labels.shape[1]
    if int(num_relevant.max()) > k:
        raise ValueError(f"mAP@R needs {int(num_relevant.max())} neighbours per query, got {k}")
    ranks = torch.arange(1, k + 1, device=neighbour_labels.device)
    relevant = (neighbour_labels == query_labels[:, None]) & (ranks[None, :] <= num_relevant[:, None])
    precision = relevant.cumsum(dim=1) / ranks
    scored = num_relevant > 0
    average_precision = (precision * relevant).sum(dim=1)[scored] / num_relevant[scored]
    return _mean(average_precision)


def retrieval_metrics(query_embeddings: torch.Tensor, query_labels: torch.Tensor,
                      gallery_embeddings: torch.Tensor | None = None, gallery_labels: torch.Tensor | None = None,
                      num_classes: int | None = None, ks: Sequence[int] = RECALL_KS,
                      query_block: int = 1024, gallery_block: int = 16384,
                      query_groups: Sequence[int] | torch.Tensor | None = None,
                      gallery_groups: Sequence[int] | torch.Tensor | None = None) -> dict:
    """Every metric of a query set searched against a gallery.

    Args:
        query_embeddings: n_q x D rows from `combine_learners`.
        query_labels: n_q class indices.
        gallery_embeddings, gallery_labels: the gallery; None means leave-one-out within the queries
            (each query excluded by index).
        num_classes: size of the confusion matrix.
        ks: the K of Recall@K.
        query_block, gallery_block: block sizes of the ranking (see `topk_similar`).
        query_groups, gallery_groups: integer group codes (slides or patients; see `topk_similar`):
            no gallery item of the query's group is a neighbour, nor counts as relevant for Recall@K
            and mAP@R. In leave-one-out only query_groups is passed (the gallery is the queries).
            One group per item gives exactly the numbers without groups.
    Returns:
        kimia_accuracy's dict plus "recall@K", "map@r", "num_gallery", "num_lone_queries" and
        "predicted" (n_q int64 array).
    """
    device = query_embeddings.device
    query_labels = torch.as_tensor(query_labels, dtype=torch.long, device=device)
    exclude = None
    leave_one_out = gallery_embeddings is None
    if leave_one_out:
        gallery_embeddings, gallery_labels = query_embeddings, query_labels
        exclude = torch.arange(query_labels.shape[0], device=device)
        gallery_groups = query_groups
    gallery_labels = torch.as_tensor(gallery_labels, dtype=torch.long, device=device)
    if num_classes is None:
        num_classes = int(max(query_labels.max(), gallery_labels.max())) + 1
    num_relevant = torch.bincount(gallery_labels, minlength=num_classes)[query_labels]
    reachable = gallery_labels.shape[0] - (1 if exclude is not None else 0)
    if (query_groups is None) != (gallery_groups is None):
        raise ValueError("pass the groups of both the queries and the gallery, or neither")
    if query_groups is not None:
        query_groups = torch.as_tensor(query_groups, dtype=torch.long, device=device)
        gallery_groups = torch.as_tensor(gallery_groups, dtype=torch.long, device=device)
        # Per query, the gallery items of its own group (all of them, of its class) drop out: counted
        # with one bincount over the (group, class) pairs, never a query x gallery matrix.
        num_codes = int(max(query_groups.max(), gallery_groups.max())) + 1
        in_group = torch.bincount(gallery_groups, minlength=num_codes)[query_groups]
        pairs = torch.bincount(gallery_groups * num_classes + gallery_labels, minlength=num_codes * num_classes)
        num_relevant = num_relevant - pairs[query_groups * num_classes + query_labels]
        per_query = gallery_labels.shape[0] - in_group
        if int(per_query.min()) == 0:
            lonely = int(per_query.argmin())
            raise ValueError(f"query {lonely}: every gallery item is of its own group, so it has no neighbour "
                             "to score (one group holds the whole gallery)")
        reachable = int(per_query.max())
    elif exclude is not None:
        num_relevant = num_relevant - (gallery_labels[exclude] == query_labels).long()
    k = min(reachable, max(max(ks), int(num_relevant.max())))
    _, indices = topk_similar(query_embeddings, gallery_embeddings, k, exclude, query_block, gallery_block,
                              query_groups, gallery_groups)
    # -1 (a place the query's groups left empty) is no class, so never a hit.
    neighbour_labels = torch.where(indices >= 0, gallery_labels[indices.clamp(min=0)], -1)
    result = kimia_accuracy(query_labels.cpu().numpy(), neighbour_labels[:, 0].cpu().numpy(), num_classes)
    result.update(recall_at_k(query_labels, neighbour_labels, num_relevant, ks))
    result["map@r"] = map_at_r(query_labels, neighbour_labels, num_relevant)
    result["num_gallery"] = int(gallery_labels.shape[0])
    result["num_lone_queries"] = int((num_relevant == 0).sum())
    result["predicted"] = neighbour_labels[:, 0].cpu().numpy()
    return result


def _mean(values: torch.Tensor) -> float:
    """Mean as a Python float; NaN when there is nothing to average (every query lone)."""
    return float(values.double().mean()) if values.numel() else float("nan")
