"""The reference code's way of computing the losses: one learner and one anchor at a time, each
anchor's pairs picked with boolean masks as the paper's code picks them, one host decision per anchor.

The tests' oracle for the vectorised losses and the benchmarks' baseline (bench/loss_speed.py), so
that both check and time against the same loop, written to be checked by eye against
docs/reproduction.md ("Losses").
"""
from __future__ import annotations

import torch

DEFAULTS = {  # the reference's hyper-parameters, as in the losses' signatures
    "ContrastiveLoss": {"margin": 0.5},
    "ABELoss": {"lambda_div": 0.05, "margin_c": 0.5, "margin_div": 0.2},
    "MSLoss": {"alpha": 2.0, "beta": 5.0, "lam": 0.5, "eps": 0.2},
}


def _anchor_term(name: str, pos: torch.Tensor, neg: torch.Tensor, hp: dict) -> tuple[torch.Tensor, int] | None:
    """One anchor's loss and the number of pairs it used, or None if it is skipped."""
    if name == "ContrastiveLoss":
        return torch.relu(neg - hp["margin"]).mean() - pos.mean(), len(pos) + len(neg)
    if name == "ABELoss":
        return torch.relu(hp["margin_c"] - pos).mean() + neg.mean(), len(pos) + len(neg)
    mined_neg = neg[neg + hp["eps"] > pos.min()]
    mined_pos = pos[pos - hp["eps"] < neg.max()]
    if len(mined_pos) == 0 or len(mined_neg) == 0:
        return None
    alpha, beta, lam = hp["alpha"], hp["beta"], hp["lam"]
    value = (
        torch.log(1 + torch.exp(-alpha * (mined_pos - lam)).sum()) / alpha
        + torch.log(1 + torch.exp(beta * (mined_neg - lam)).sum()) / beta
    )
    return value, len(mined_pos) + len(mined_neg)


def per_anchor_loss(name: str, embeddings: torch.Tensor, labels: torch.Tensor, self_pair: str = "reference",
                    **options: float) -> tuple[torch.Tensor, int, int]:
    """(loss, anchors used, pairs used) for M x n x d embeddings, one learner and one anchor at a time;
    `options` override the reference's hyper-parameters (`DEFAULTS`), `self_pair` as in `build_loss`."""
    hp = DEFAULTS[name] | options
    num_learners, n, _ = embeddings.shape
    labels = labels.to(embeddings.device)
    others = ~torch.eye(n, dtype=torch.bool, device=embeddings.device)
    learner_losses, anchors, pairs = [], 0, 0
    for x in embeddings:
        sim = x @ x.T
        anchor_losses = []
        for i in range(n):
            if self_pair == "reference":  # the paper's code: the self pair stays when x . x < 1
                pos = sim[i][(labels == labels[i]) & (sim[i] < 1)]
            else:
                pos = sim[i][(labels == labels[i]) & others[i]]
            neg = sim[i][labels != labels[i]]
            if len(pos) == 0 or len(neg) == 0:
                continue
            term = _anchor_term(name, pos, neg, hp)
            if term is not None:
                anchor_losses.append(term[0])
                anchors += 1
                pairs += term[1]
        learner_losses.append(sum(anchor_losses) / len(anchor_losses) if anchor_losses else embeddings.sum() * 0)
    loss = sum(learner_losses) / num_learners
    if name == "ABELoss" and num_learners > 1 and anchors > 0:
        divergence = [
            torch.relu((embeddings[a] * embeddings[b]).sum(1) - hp["margin_div"]).mean()
            for a in range(num_learners)
            for b in range(a + 1, num_learners)
        ]
        loss = loss + hp["lambda_div"] * sum(divergence) / len(divergence)
    return loss, anchors, pairs
