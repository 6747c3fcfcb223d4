"""The three backbones against the reference code's outputs (tests/data/fixtures_seed1.pt) and layout
(tests/data/state_dict_layout.json), plus the registry, options, sizes, gradients, autocast and summary."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models import MODEL_NAMES, build_head, build_model, canonical_model_name, summary
from models.abe_m import STAGE4
from models.layers import PointwiseConv2d, StackedBatchNorm2d, pooled_embedding
from models.reference import ReferenceStyle, filled_state_dict

DATA = Path(__file__).resolve().parent / "data"
REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4  # right implementations differ from the reference fixtures by ~1e-7

# Variant names of the fixture and layout files -> (model name, build options).
VARIANTS = {
    "se_resnet50": ("se_resnet50", {}),
    "se_resnet50_no_attention": ("se_resnet50", {"attention": False}),
    "resnet50": ("resnet50", {}),
    "ABE_M": ("ABE_M", {}),
}
# The attention trunk's first BatchNorm, which the reference runs once per head.
TRUNK_BATCHNORM = {"resnet50": "att_layer.0.bn1", "ABE_M": "att_a4.b1.1", "se_resnet50": "att_layer.0.bn1"}


def layout_template(variant: str) -> dict[str, torch.Tensor]:
    """An empty state_dict with the reference's keys, in its order, and shapes."""
    entries = LAYOUT[variant]["state_dict"]
    return {key: torch.zeros(shape, dtype=torch.long if key.endswith("num_batches_tracked") else torch.float32)
            for key, shape in entries}


LAYOUT = json.loads((DATA / "state_dict_layout.json").read_text())
FIXTURES = torch.load(DATA / "fixtures_seed1.pt", weights_only=False)


def dropout_to_eval(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def reference_run(request: pytest.FixtureRequest) -> dict:
    """One model per variant with the fixture's weights: its eval and train embeddings and running stats."""
    variant = request.param
    name, options = VARIANTS[variant]
    model = build_model(name, **options)
    expected = FIXTURES["models"][variant]
    model.load_state_dict(filled_state_dict(model.state_dict(), expected["seed"]), strict=True)
    images = FIXTURES["input"]
    with torch.no_grad():
        model.eval()
        eval_embeddings = model(images)
        model.train()
        dropout_to_eval(model)
        train_embeddings = model(images)
    return {"variant": variant, "model": model, "expected": expected,
            "eval": eval_embeddings, "train": train_embeddings}


# ----------------------------------------------------------------------------- the reference's numbers
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fill_rule_matches_reference_sums(variant: str) -> None:
    expected = FIXTURES["models"][variant]
    values = [t.double() for t in filled_state_dict(layout_template(variant), expected["seed"]).values()]
    assert sum(v.sum().item() for v in values) == pytest.approx(expected["filled_sum"], rel=1e-9)
    assert sum(v.square().sum().item() for v in values) == pytest.approx(expected["filled_sum_sq"], rel=1e-9)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_layout_and_parameter_count(variant: str) -> None:
    name, options = VARIANTS[variant]
    model = build_model(name, **options)
    ours = [[key, list(tensor.shape)] for key, tensor in model.state_dict().items()]
    assert ours == LAYOUT[variant]["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == LAYOUT[variant]["parameters"]
    # A state_dict written by the reference (its layout, its values) loads strictly.
    reference = filled_state_dict(layout_template(variant), seed=7)
    model.load_state_dict(reference, strict=True)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in reference.items())


def test_eval_embeddings_match_reference(reference_run: dict) -> None:
    expected = reference_run["expected"]["eval_embeddings"]
    ours = torch.stack(reference_run["eval"])
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < TOLERANCE


def test_train_embeddings_match_reference(reference_run: dict) -> None:
    expected = reference_run["expected"]["train_embeddings"]
    ours = torch.stack(reference_run["train"])
    assert (ours - expected).abs().max().item() < TOLERANCE
    # Batch statistics instead of running ones: train and eval outputs differ, so both checks count.
    assert (ours - torch.stack(reference_run["eval"])).abs().max().item() > 100 * TOLERANCE


def test_running_statistics_match_reference_after_one_train_forward(reference_run: dict) -> None:
    expected = reference_run["expected"]["running_stats_after_train_forward"]
    state = reference_run["model"].state_dict()
    assert set(expected) == {key for key in state if ".running_" in key}
    worst = max((state[key] - value).abs().max().item() for key, value in expected.items())
    assert worst < TOLERANCE
    model = reference_run["model"]
    if model.num_learners > 1:
        # The fixture tells the trunk's momentum 1 - 0.9**M from the default 0.1: running means started at
        # zero, so one update left momentum * batch mean, and 0.1 would leave 0.1 / momentum of that.
        key = TRUNK_BATCHNORM[reference_run["variant"]] + ".running_mean"
        with_default_momentum = state[key] * (0.1 / (1 - 0.9 ** model.num_learners))
        assert (with_default_momentum - expected[key]).abs().max().item() > 100 * TOLERANCE


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_channels_last_matches_reference(variant: str) -> None:
    """channels_last takes other kernels (PointwiseConv2d's matrix products among them): same numbers."""
    name, options = VARIANTS[variant]
    model = build_model(name, **options)
    expected = FIXTURES["models"][variant]
    model.load_state_dict(filled_state_dict(model.state_dict(), expected["seed"]), strict=True)
    model = model.to(memory_format=torch.channels_last)
    images = FIXTURES["input"].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        eval_embeddings = torch.stack(model.eval()(images))
        model.train()
        dropout_to_eval(model)
        train_embeddings = torch.stack(model(images))
    assert (eval_embeddings - expected["eval_embeddings"]).abs().max().item() < TOLERANCE
    assert (train_embeddings - expected["train_embeddings"]).abs().max().item() < TOLERANCE


# ----------------------------------------------------------------------------- exact speed-ups
@pytest.mark.parametrize("stride, bias", [(1, False), (2, False), (1, True)])
@pytest.mark.parametrize("in_channels, out_channels", [(256, 512), (2048, 256)])
def test_pointwise_conv_equals_conv2d(stride: int, bias: bool, in_channels: int, out_channels: int,
                                      device: torch.device) -> None:
    torch.manual_seed(0)
    pointwise = PointwiseConv2d(in_channels, out_channels, stride=stride, bias=bias).to(device)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=bias).to(device)
    conv.load_state_dict(pointwise.state_dict())
    x = torch.randn(3, in_channels, 7, 6, device=device).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(3, out_channels, (7 - 1) // stride + 1, (6 - 1) // stride + 1, device=device)
    outputs = []
    for layer in (pointwise, conv):
        x_copy = x.clone().requires_grad_()
        out = layer(x_copy)
        out.backward(grad)
        outputs.append((out, x_copy.grad, *(p.grad for p in layer.parameters())))
    for ours, theirs in zip(*outputs):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    assert outputs[0][0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("grad, dtype", [(True, None), (False, None), (False, torch.bfloat16)])
def test_pointwise_conv_is_one_matrix_product(stride: int, grad: bool, dtype: torch.dtype | None) -> None:
    """Not a batch of them: for a strided input and a weight without gradient (autocast's bfloat16 copy
    at inference, a frozen layer) matmul would copy the weight once per row of pixels."""
    layer = PointwiseConv2d(256, 512, stride=stride).to(memory_format=torch.channels_last).requires_grad_(grad)
    x = torch.randn(2, 256, 8, 8).contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    with torch.set_grad_enabled(grad), autocast, FlopCounterMode(display=False) as counter:
        layer(x)
    assert {str(op) for op in counter.get_flop_counts()["Global"]} == {"aten.mm"}


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_stacked_batchnorm_equals_one_call_per_sub_batch(momentum: float | None, memory_format: torch.memory_format,
                                                         device: torch.device) -> None:
    torch.manual_seed(0)
    stacked = StackedBatchNorm2d(6, stacks=3, momentum=momentum).to(device)
    separate = nn.BatchNorm2d(6, momentum=momentum).to(device)
    for norm in (stacked, separate):
        nn.init.uniform_(norm.weight)
        nn.init.uniform_(norm.bias)
    separate.load_state_dict(stacked.state_dict())
    # Sub-batches with different means and spreads, so that pooled statistics would show.
    x = (torch.randn(12, 6, 5, 5) * torch.arange(1, 13).view(12, 1, 1, 1) + torch.arange(12).view(12, 1, 1, 1))
    x = x.to(device).contiguous(memory_format=memory_format)
    grad = torch.randn(12, 6, 5, 5, device=device)
    x_stacked, x_separate = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(2):
        out_stacked = stacked(x_stacked)
        out_separate = torch.cat([separate(chunk) for chunk in x_separate.chunk(3)])
    assert out_stacked.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(out_stacked, out_separate, rtol=0, atol=1e-6)
    out_stacked.backward(grad)
    out_separate.backward(grad)
    torch.testing.assert_close(x_stacked.grad, x_separate.grad, rtol=0, atol=1e-6)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(stacked, name).grad, getattr(separate, name).grad, rtol=0, atol=1e-5)
    for key, value in separate.state_dict().items():
        torch.testing.assert_close(stacked.state_dict()[key], value, rtol=0, atol=1e-6)
    assert stacked.num_batches_tracked.item() == 6
    stacked.eval()
    separate.eval()
    torch.testing.assert_close(stacked(x), separate(x), rtol=0, atol=1e-6)


def test_stacked_batchnorm_rejects_a_batch_it_cannot_split() -> None:
    with pytest.raises(ValueError, match="4 equal sub-batches, got a batch of 6"):
        StackedBatchNorm2d(3, stacks=4)(torch.rand(6, 3, 2, 2))


def test_tail_batchnorm_counts_one_update_per_head(device: torch.device) -> None:
    model = build_model("resnet50").to(device).train()
    model(torch.rand(2, 3, 64, 64, device=device))
    assert model.layers4[0].bn1.num_batches_tracked.item() == 4
    assert model.layers0.bn1.num_batches_tracked.item() == 1


def test_abe_m_dropout_draws_the_reference_masks() -> None:
    """In training mode, with dropout on, the stacked tail gives the reference's per-head embeddings for the
    same seed: torch draws a Bernoulli mask for M x n rows as the M masks of n rows it draws one after
    the other. On CPU only: that is a property of the CPU generator's stream, not one CUDA promises."""
    torch.manual_seed(0)
    model = build_model("ABE_M").train()
    images = torch.rand(2, 3, 64, 64)
    torch.manual_seed(1)
    ours = model(images)
    for module in model.modules():
        if isinstance(module, StackedBatchNorm2d):
            module.stacks = 1
    torch.manual_seed(1)
    features = model.forward_stem(images)
    trunk = model.forward_trunk(features)
    reference = []
    for head in model.attention_heads():
        x = features * head(trunk)
        for name in STAGE4:
            x = getattr(model, name)(x)
        x = model.b5(model.a5(model.maxpool(x)))
        reference.append(pooled_embedding(x, model.linear, model.dropout))
    assert max((a - b).abs().max().item() for a, b in zip(ours, reference)) < 1e-5
    assert (ours[0] - ours[1]).abs().max().item() > 1e-3


# ----------------------------------------------------------------------------- registry and options
def test_names_are_case_insensitive_with_reference_alias() -> None:
    assert MODEL_NAMES == ("se_resnet50", "resnet50", "ABE_M")
    assert canonical_model_name("SE_ResNet") == "se_resnet50"
    assert canonical_model_name("abe_m") == "ABE_M"
    assert canonical_model_name("RESNET50") == "resnet50"


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg16'; choose one of se_resnet50, resnet50, ABE_M"):
        build_model("vgg16")


@pytest.mark.parametrize("name, options, message", [
    ("resnet50", {"attention": False}, "model resnet50 has no option attention"),
    ("ABE_M", {"embedding_dim": 510}, r"embedding_dim \(510\) must be a positive multiple of num_learners \(4\)"),
    ("resnet50", {"num_learners": 0}, "num_learners must be at least 1"),
    ("se_resnet", {"num_learners": 2}, "se_resnet50 has one learner"),
])
def test_bad_options_are_rejected(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(name, **options)


@pytest.mark.parametrize("name, options, num_learners, width", [
    ("se_resnet50", {}, 1, 512),
    ("resnet50", {}, 4, 128),
    ("ABE_M", {}, 4, 128),
    ("resnet50", {"num_learners": 2, "embedding_dim": 256}, 2, 128),
    ("ABE_M", {"num_learners": 1}, 1, 512),
])
def test_options_set_learners_and_widths(name: str, options: dict, num_learners: int, width: int,
                                         device: torch.device) -> None:
    model = build_model(name, **options).to(device)
    assert model.num_learners == num_learners
    assert model.embedding_dim == num_learners * width
    assert len(model.attention_heads()) == num_learners
    trunk_momentum = dict(model.named_modules())[TRUNK_BATCHNORM[canonical_model_name(name)]].momentum
    assert trunk_momentum == pytest.approx(1 - 0.9 ** num_learners)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64, device=device))
    assert [tuple(e.shape) for e in out] == [(1, width)] * num_learners
    assert all(e.device.type == device.type for e in out)


def test_only_the_trunk_takes_the_repeated_update_momentum() -> None:
    model = build_model("resnet50")
    momenta = {name: module.momentum for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)}
    trunk = [m for name, m in momenta.items() if name.startswith("att_layer.")]
    rest = [m for name, m in momenta.items() if not name.startswith("att_layer.")]
    assert len(trunk) == 3 * 3 + 1 and trunk == pytest.approx([0.3439] * len(trunk))
    assert rest and set(rest) == {0.1}


# ----------------------------------------------------------------------------- sizes, gradients, precision
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_any_input_from_64_pixels_gives_unit_embeddings(variant: str, device: torch.device) -> None:
    name, options = VARIANTS[variant]
    model = build_model(name, **options).to(device).eval()
    width = model.embedding_dim // model.num_learners
    with torch.no_grad():
        for size in [(64, 64), (72, 88)]:
            out = model(torch.rand(2, 3, *size, device=device))
            assert len(out) == model.num_learners
            for embedding in out:
                assert embedding.shape == (2, width) and embedding.dtype == torch.float32
                torch.testing.assert_close(embedding.norm(dim=1), torch.ones(2, device=device))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_parameter_gets_a_finite_gradient(name: str, device: torch.device) -> None:
    torch.manual_seed(0)
    model = build_model(name).to(device).train()
    out = model(torch.rand(2, 3, 64, 64, device=device))
    assert all(torch.isfinite(e).all() for e in out)
    # Pull the two images apart in every learner, as a metric loss would.
    sum((e[0] * e[1]).sum() for e in out).backward()
    for key, parameter in model.named_parameters():
        assert parameter.grad is not None, key
        assert torch.isfinite(parameter.grad).all(), key
        if parameter.dim() > 1:  # conv and linear weights; biases just before a BatchNorm get zero by design
            assert parameter.grad.abs().sum() > 0, key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_autocast_and_channels_last_keep_float32_embeddings(name: str, dtype: torch.dtype,
                                                            device: torch.device) -> None:
    """train.py's --amp bf16 / fp16 with --channels-last: float32 unit embeddings close to float32's."""
    model = build_model(name)
    model.load_state_dict(filled_state_dict(model.state_dict(), seed=1))
    model = model.to(device).eval()
    images = FIXTURES["input"][:2, :, :64, :64].to(device)
    with torch.no_grad():
        reference = model(images)
        model = model.to(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype):
            ours = model(images.contiguous(memory_format=torch.channels_last))
    for low, high in zip(ours, reference):
        assert low.dtype == torch.float32
        torch.testing.assert_close(low.norm(dim=1), torch.ones(2, device=device))
        assert F.cosine_similarity(low, high).min() > 0.999


# ----------------------------------------------------------------------------- summary
def test_summary_counts_shared_layers_once_and_leaves_the_model_alone() -> None:
    model = build_model("ABE_M").train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    text = summary(model, crop_size=64)
    assert "Total params: 10,534,720" in text  # torchsummary would say 35.3 M
    assert model.training
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


@pytest.mark.slow
def test_command_line_summary_and_bad_name() -> None:
    ok = subprocess.run([sys.executable, "-m", "models", "se_resnet", "--no-attention", "--crop-size", "64",
                         "--depth", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert f"Total params: {LAYOUT['se_resnet50_no_attention']['parameters']:,}" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "models", "vgg16"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: unknown model 'vgg16'; choose one of se_resnet50, resnet50, ABE_M"


# ----------------------------------------------------------------------------- benchmark baseline
@pytest.mark.parametrize("name", ["resnet50", "ABE_M"])
def test_benchmark_baseline_computes_the_same_embeddings_and_gradients(name: str, device: torch.device) -> None:
    """bench/model_speed.py times against a reference-style copy (trunk and tail once per head, nn.Conv2d for
    1x1): it must compute what the model computes. In float64, because BatchNorm over the few values of
    a small input's last stages turns float32 rounding into percent-size gradient differences."""
    torch.manual_seed(0)
    model = build_model(name).train().to(device, torch.float64, memory_format=torch.channels_last)
    dropout_to_eval(model)
    baseline = ReferenceStyle(model)
    assert not any(isinstance(m, PointwiseConv2d) for m in baseline.modules())
    images = torch.rand(4, 3, 64, 64, dtype=torch.float64).to(device).contiguous(memory_format=torch.channels_last)
    results = []
    for variant in (model, baseline):
        out = variant(images)
        sum((e[0] * e[1] - e[2] * e[3]).sum() for e in out).backward()
        results.append((out, dict(variant.named_parameters())))
    (ours, our_parameters), (theirs, their_parameters) = results
    assert max((a - b).abs().max().item() for a, b in zip(ours, theirs)) < 1e-10
    for key, parameter in our_parameters.items():
        torch.testing.assert_close(parameter.grad, their_parameters["model." + key].grad, rtol=1e-7, atol=1e-9)


def test_projection_head_is_its_documented_layers() -> None:
    """train.py --freeze-trunk's head: the unit input through one linear layer, or two with a ReLU, to unit rows."""
    torch.manual_seed(0)
    vectors = torch.randn(5, 12) * 3
    linear, mlp = build_head("linear", 12, 6), build_head("mlp", 12, 6)
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    (w, b), (w1, b1, w2, b2) = ([p.detach() for p in head.parameters()] for head in (linear, mlp))
    expected = [unit @ w.T + b, torch.relu(unit @ w1.T + b1) @ w2.T + b2]
    for head, raw in zip((linear, mlp), expected):
        (rows,) = head(vectors)
        torch.testing.assert_close(rows, raw / raw.norm(dim=1, keepdim=True))
    assert w1.shape == (12, 12)  # the MLP's hidden layer is as wide as its input
    with pytest.raises(ValueError, match="unknown head 'conv'"):
        build_head("conv", 12)
