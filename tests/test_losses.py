"""The three metric losses against the reference's numbers and against a naive per-anchor version.

`losses.reference.per_anchor_loss` is the losses of docs/reproduction.md written out one learner and one anchor at
a time, the pairs picked as the paper's code picks them (`self_pair="reference"`: a same-class pair
is a positive when s < 1) or with the self pair dropped by index (`"exclude"`), so that it is easy to
check by eye; the fast losses must agree with it in value, gradient and usage counts on hundreds
of random batches, the awkward ones included. The reference's fixtures were computed with the self
pair dropped by index: they test `self_pair="exclude"`.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import losses
from losses import SELF_PAIR_RULES, ABELoss, ContrastiveLoss, MSLoss, build_loss
from losses.reference import DEFAULTS, per_anchor_loss as naive_loss

FIXTURES = Path(__file__).parent / "data" / "fixtures_seed1.pt"
REPO = Path(__file__).resolve().parents[1]
# ----------------------------------------------------------------------------- random batches
KINDS = ["random", "singletons", "one_class", "no_positives", "duplicates", "well_separated"]


def make_batch(kind: str, num_learners: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 13, (1,), generator=g))
    d = 8
    x = torch.randn(num_learners, n, d, generator=g, dtype=torch.float64)
    if kind == "random":
        labels = torch.randint(0, max(1, n // 3), (n,), generator=g)
    elif kind == "singletons":  # every other sample alone in its class
        labels = torch.tensor([k if k % 2 else 0 for k in range(n)])
    elif kind == "one_class":
        labels = torch.zeros(n, dtype=torch.long)
    elif kind == "no_positives":
        labels = torch.randperm(n, generator=g)
    elif kind == "duplicates":  # copies of one row, inside and across classes: s = 1 pairs that are not self pairs
        labels = torch.randint(0, 3, (n,), generator=g)
        x[:, n // 2 :] = x[:, : n - n // 2].clone()
    else:  # tight, far apart classes: MS mining keeps nothing for many anchors
        labels = torch.randint(0, 3, (n,), generator=g)
        centres = torch.eye(d, dtype=torch.float64)[labels] * 10
        x = centres + 0.05 * x
    return F.normalize(x, dim=-1).to(dtype), labels


def _fast(name: str, x: torch.Tensor, labels: torch.Tensor, **options):
    leaf = x.detach().clone().requires_grad_()
    loss_fn = build_loss(name, **options)
    value = loss_fn(list(leaf.unbind(0)), labels)
    (grad,) = torch.autograd.grad(value, leaf)
    return value, grad, loss_fn.stats


def _naive(name: str, x: torch.Tensor, labels: torch.Tensor, **options):
    leaf = x.detach().clone().requires_grad_()
    value, anchors, pairs = naive_loss(name, leaf, labels, **options)
    (grad,) = torch.autograd.grad(value, leaf, allow_unused=True)
    return value, torch.zeros_like(leaf) if grad is None else grad, anchors, pairs


def _assert_matches_naive(name: str, x: torch.Tensor, labels: torch.Tensor, tol: float, context: str, **options) -> float:
    """Fast against naive in value, gradient and counts; returns the loss."""
    value, grad, stats = _fast(name, x, labels, **options)
    ref_value, ref_grad, ref_anchors, ref_pairs = _naive(name, x, labels, **options)
    assert value.dtype == x.dtype, context
    assert value.item() == pytest.approx(ref_value.item(), abs=tol), context
    torch.testing.assert_close(grad, ref_grad, atol=tol, rtol=0, msg=context)
    assert (stats["anchors"].item(), stats["pairs"].item()) == (ref_anchors, ref_pairs), context
    return value.item()


@pytest.mark.parametrize("self_pair", SELF_PAIR_RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("num_learners", [1, 4])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_matches_naive_per_anchor_loss_on_random_batches(name, kind, num_learners, dtype, self_pair):
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for seed in range(8):
        x, labels = make_batch(kind, num_learners, dtype, seed)
        context = f"{name} {kind} M={num_learners} seed={seed} self_pair={self_pair} labels={labels.tolist()}"
        _assert_matches_naive(name, x, labels, tol, context, self_pair=self_pair)


def test_degenerate_kinds_really_are_degenerate():
    """Guards the random-batch test: its awkward kinds must produce the cases they are named after."""
    for seed in range(8):
        for kind in ("one_class", "no_positives"):
            x, labels = make_batch(kind, 4, torch.float32, seed)
            assert naive_loss("ContrastiveLoss", x, labels, self_pair="exclude")[1] == 0
    skipped_by_mining = kept_self = 0
    for seed in range(8):
        x, labels = make_batch("well_separated", 1, torch.float64, seed)
        skipped_by_mining += naive_loss("ContrastiveLoss", x, labels)[1] - naive_loss("MSLoss", x, labels)[1]
        x, labels = make_batch("no_positives", 4, torch.float32, seed)
        kept_self += naive_loss("ContrastiveLoss", x, labels)[1]  # anchors whose only positive is themselves
    assert skipped_by_mining > 0
    assert kept_self > 0


# ----------------------------------------------------------------------------- the paper's self-pair rule
def _training_like_batch(num_learners: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit float32 embeddings of total size 512 over the M learners and labels from 24 classes, n = 60."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(num_learners, 60, 512 // num_learners, generator=g), dim=-1)
    return x.to(device), torch.randint(0, 24, (60,), generator=g).to(device)


def _self_similarity(x: torch.Tensor) -> torch.Tensor:
    """M x n: x . x per learner, computed as the paper's code computes S (one matrix product per learner)."""
    return torch.stack([torch.diagonal(e @ e.T) for e in x])


@pytest.mark.parametrize("num_learners", [1, 4])
@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_default_is_the_paper_codes_self_pair_rule(name, num_learners, device):
    kept, rows, differences = 0, 0, []
    for seed in range(6):
        x, labels = _training_like_batch(num_learners, seed, device)
        context = f"{name} M={num_learners} seed={seed} on {device}"
        default = _assert_matches_naive(name, x, labels, 1e-5, context)
        kept += int((_self_similarity(x) < 1).sum())
        rows += x.shape[0] * x.shape[1]
        differences.append(abs(default - _fast(name, x, labels, self_pair="exclude")[0].item()))
    # The rule must matter for the test to mean anything: a good share of rows keep themselves...
    assert 0.25 < kept / rows < 0.6
    # ...and for Contrastive and ABE that moves the loss well beyond the tolerance (MS mining almost
    # never keeps a self pair).
    if name != "MSLoss":
        assert min(differences) > 1e-3, differences


def _all_self_similarities_below_one(num_learners: int, n: int, d: int, device: torch.device) -> torch.Tensor:
    """Unit float32 rows with x . x < 1 as S computes it, every row redrawn until that holds."""
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(num_learners, n, d, generator=g), dim=-1).to(device)
    for _ in range(200):
        redraw = _self_similarity(x) >= 1
        if not redraw.any():
            return x
        fresh = F.normalize(torch.randn(num_learners, n, d, generator=g), dim=-1).to(device)
        x = torch.where(redraw.unsqueeze(-1), fresh, x)
    raise AssertionError("could not draw rows with x . x < 1")


@pytest.mark.parametrize("num_learners", [1, 4])
@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_anchors_whose_only_positive_is_themselves_are_used(name, num_learners, device):
    # Every label distinct: the only positive candidate of an anchor is itself, and it survives s < 1.
    n = 8
    x = _all_self_similarities_below_one(num_learners, n, 16, device)
    labels = torch.arange(n, device=device)
    assert (_self_similarity(x) < 1).all()
    value = _assert_matches_naive(name, x, labels, 1e-5, f"{name} M={num_learners} on {device}")
    if name == "ContrastiveLoss":
        # Per anchor mean relu(s - 0.5) over the other samples minus s_jj, about -1: not skipped.
        sim = x @ x.transpose(-1, -2)
        others = ~torch.eye(n, dtype=torch.bool, device=device)
        negative = ((sim - 0.5).relu() * others).sum(-1) / (n - 1)
        expected = (negative - torch.diagonal(sim, dim1=-2, dim2=-1)).mean().item()
        assert value == pytest.approx(expected, abs=1e-6)
        assert value < -0.5
    excluded = build_loss(name, self_pair="exclude")
    assert excluded(list(x.unbind(0)), labels).item() == 0.0
    assert excluded.stats["anchors"].item() == 0


@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_unknown_self_pair_rule_names_the_allowed_ones(name):
    with pytest.raises(ValueError, match=r"self_pair: expected 'reference' .* or 'exclude' .*, got 'index'"):
        build_loss(name, self_pair="index")
    for rule in SELF_PAIR_RULES:
        assert build_loss(name, self_pair=rule).self_pair == rule
    assert build_loss(name).self_pair == "reference"


@pytest.mark.parametrize("num_learners", [1, 4])
def test_ms_paper_settings_match_naive(num_learners):
    options = {"beta": 50.0, "eps": 0.1}
    for seed in range(8):
        x, labels = make_batch("random", num_learners, torch.float64, 100 + seed)
        value, grad, _ = _fast("MSLoss", x, labels, **options)
        ref_value, ref_grad, _, _ = _naive("MSLoss", x, labels, **options)
        assert value.item() == pytest.approx(ref_value.item(), abs=1e-10)
        torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- reference fixtures
def _fixture_cases() -> list:
    cases = torch.load(FIXTURES, weights_only=False)["losses"]
    return [
        pytest.param(case, name, id=f"case{index}-M{case['m']}-n{case['n']}-{name}")
        for index, case in enumerate(cases)
        for name in case["expected"]
    ]


@pytest.mark.parametrize("case,name", _fixture_cases())
def test_exclude_matches_reference_fixtures(case, name):
    embeddings = case["embeddings"].clone().requires_grad_()
    value = build_loss(name, self_pair="exclude")(list(embeddings.unbind(0)), case["labels"])
    (grad,) = torch.autograd.grad(value, embeddings)
    expected = case["expected"][name]
    assert value.item() == pytest.approx(expected["loss"].item(), abs=1e-5)
    torch.testing.assert_close(grad, expected["grads"], atol=1e-5, rtol=0)


def test_fixtures_cover_every_loss_both_learner_counts_and_the_degenerate_batch():
    cases = torch.load(FIXTURES, weights_only=False)["losses"]
    assert {name for case in cases for name in case["expected"]} == set(losses.LOSS_NAMES)
    assert {case["m"] for case in cases} == {1, 4}
    assert any(len(set(case["labels"].tolist())) == case["n"] for case in cases)


# ----------------------------------------------------------------------------- degenerate batches
def _no_positive_batch(num_learners: int, self_pair: str) -> torch.Tensor:
    """Embeddings for labels 0..5. Under the reference's rule a sample is its own positive unless
    x . x >= 1, so there the rows are signed one-hot vectors, whose x . x is exactly 1."""
    if self_pair == "exclude":
        return F.normalize(torch.randn(num_learners, 6, 16), dim=-1)
    signs = torch.randint(0, 2, (num_learners, 6, 1)) * 2.0 - 1.0
    return torch.stack([torch.eye(16)[torch.randperm(16)[:6]] for _ in range(num_learners)]) * signs


@pytest.mark.parametrize("self_pair", SELF_PAIR_RULES)
@pytest.mark.parametrize("num_learners", [1, 4])
@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_batch_without_positives_gives_zero_loss_zero_grads_and_zero_anchors(name, num_learners, self_pair):
    x = _no_positive_batch(num_learners, self_pair).requires_grad_()
    loss_fn = build_loss(name, self_pair=self_pair)
    value = loss_fn(list(x.unbind(0)), torch.arange(6))
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(x.grad).all() and x.grad.abs().max().item() == 0.0
    assert loss_fn.stats["anchors"].item() == 0 and loss_fn.stats["pairs"].item() == 0


def test_stats_count_anchors_and_pairs_of_a_known_batch():
    # Classes 0 0 0 1 1 2: the sample of class 2 has no positive; five anchors with five pairs each.
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    x = F.normalize(torch.randn(4, 6, 8), dim=-1)
    loss_fn = ContrastiveLoss(self_pair="exclude")
    loss_fn(list(x.unbind(0)), labels)
    assert loss_fn.stats["anchors"].item() == 5 * 4
    assert loss_fn.stats["pairs"].item() == 5 * 5 * 4
    assert all(t.dim() == 0 and t.device == x.device for t in loss_fn.stats.values())


def test_stats_before_any_call_raise_a_clear_error():
    with pytest.raises(RuntimeError, match="call the loss on a batch first"):
        MSLoss().stats


# ----------------------------------------------------------------------------- interface
def test_build_loss_names_aliases_and_options():
    assert losses.LOSS_NAMES == ("ContrastiveLoss", "ABELoss", "MSLoss")
    assert isinstance(build_loss("msloss"), MSLoss)
    assert isinstance(build_loss("MsLoss"), MSLoss)  # the reference's spelling
    assert isinstance(build_loss("abeloss"), ABELoss)
    assert isinstance(build_loss("CONTRASTIVELOSS"), ContrastiveLoss)
    assert losses.canonical_loss_name("MsLoss") == "MSLoss"
    paper = build_loss("MSLoss", beta=50, eps=0.1)
    assert (paper.alpha, paper.beta, paper.lam, paper.eps) == (2.0, 50, 0.5, 0.1)
    assert build_loss("ContrastiveLoss", margin=0.3).margin == 0.3
    with pytest.raises(TypeError):
        build_loss("MSLoss", margin=0.3)


def test_unknown_loss_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown loss 'TripletLoss'; choose one of ContrastiveLoss, ABELoss, MSLoss"):
        build_loss("TripletLoss")


def test_defaults_are_the_reference_settings():
    for name, defaults in DEFAULTS.items():
        loss_fn = build_loss(name)
        assert {key: getattr(loss_fn, key) for key in defaults} == defaults
        assert loss_fn.self_pair == "reference"


@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_single_tensor_is_one_learner_and_no_grad_gives_the_same_value(name):
    x, labels = make_batch("random", 1, torch.float32, 3)
    loss_fn = build_loss(name)
    as_list = loss_fn([x[0]], labels)
    as_tensor = loss_fn(x[0], labels)
    with torch.no_grad():
        evaluated = loss_fn(x[0], labels)
    assert as_list.item() == as_tensor.item() == evaluated.item()


@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_bad_inputs_raise_errors_naming_the_argument(name):
    loss_fn = build_loss(name)
    x = F.normalize(torch.randn(6, 8), dim=-1)
    with pytest.raises(ValueError, match="labels: expected a 1-D tensor of 6 labels"):
        loss_fn(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="embeddings: expected n x d tensors of one shape"):
        loss_fn([x, x[:, :4]], torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="embeddings: expected a tensor or a non-empty list"):
        loss_fn([], torch.zeros(6, dtype=torch.long))


@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_computes_in_float32_under_autocast_and_for_half_inputs(name):
    x, labels = make_batch("random", 4, torch.float32, 5)
    loss_fn = build_loss(name)
    expected = loss_fn(list(x.unbind(0)), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss_fn(list(x.unbind(0)), labels)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(expected.item(), abs=1e-6)
    from_bfloat16 = loss_fn(list(x.to(torch.bfloat16).unbind(0)), labels)
    assert from_bfloat16.dtype == torch.float32
    assert math.isfinite(from_bfloat16.item())


@pytest.mark.parametrize("self_pair", SELF_PAIR_RULES)
@pytest.mark.parametrize("num_learners", [1, 4])
@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_forward_backward_and_stats_need_no_host_synchronisation(name, num_learners, self_pair):
    # Meta tensors have no data: any .item(), bool() or Python branch on a value would raise.
    x = torch.empty(num_learners, 60, 128, device="meta", requires_grad=True)
    labels = torch.empty(60, dtype=torch.long, device="meta")
    loss_fn = build_loss(name, self_pair=self_pair)
    value = loss_fn(list(x.unbind(0)), labels)
    value.backward()
    assert value.shape == () and x.grad.shape == x.shape
    assert all(t.shape == () and t.device.type == "meta" for t in loss_fn.stats.values())


def test_the_per_anchor_loop_matches_the_fixtures_with_the_self_pair_excluded():
    """losses.reference is the tests' oracle and the benchmarks' baseline: check it on the reference's numbers."""
    for case in torch.load(FIXTURES, weights_only=False)["losses"]:
        for name, expected in case["expected"].items():
            value = naive_loss(name, case["embeddings"], case["labels"], self_pair="exclude")[0]
            assert float(value) == pytest.approx(expected["loss"].item(), abs=1e-5), name


@pytest.mark.slow
def test_benchmark_times_ours_against_the_per_anchor_loop():
    result = subprocess.run([sys.executable, "-m", "bench.loss_speed", "--batch-sizes", "8", "--learners",
                             "2", "--devices", "cpu", "--repeats", "1", "--baseline-repeats", "1", "--warmup", "0"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\| (\w+) \| cpu \| 2 \| 8 \| ([\d.]+) \| ([\d.]+) \| [\d.]+x \|$", result.stdout, re.M)
    assert [row[0] for row in rows] == list(losses.LOSS_NAMES)
    assert all(float(ours) > 0 and float(loop) > 0 for _, ours, loop in rows)
