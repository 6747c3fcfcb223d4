"""histo_retrieval.evaluation.protocols: the test (leave-one-out) and train protocols against the
reference's pipeline, and the t-SNE map."""
import numpy as np
import pytest
import torch
from PIL import Image

from histo_retrieval.data.datasets import KimiaDataset, eval_transform
from histo_retrieval.errors import UserError
from histo_retrieval.evaluation import protocols as evaluation
from histo_retrieval.encoders.project import load_model
from histo_retrieval.evaluation.embedder import Embedder
from histo_retrieval.evaluation.metrics import kimia_accuracy
from histo_retrieval.evaluation.protocols import Evaluator, evaluate_checkpoint

CLASSES = ("s0", "s1", "s2")
CROP = 32


def test_evaluation_matches_the_reference_pipeline(data_dir, tmp_path, write_checkpoint):
    """The cached uint8 crops give the similarities of the reference's loader (eval_transform per
    checkpoint), and every prediction is the class of a most similar other image."""
    path = tmp_path / "se_resnet50_MSLoss_0.5000.pth"
    write_checkpoint(path, "se_resnet50", crop_size=CROP, attention=False)
    result = evaluate_checkpoint(path, data_dir, protocol="test", batch_size=4, device="cpu")

    loaded = load_model(path)
    dataset = KimiaDataset(data_dir / "test", eval_transform(CROP))
    with torch.no_grad():
        reference = loaded.model(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    reference_similarity = sum(e @ e.T for e in reference) / len(reference)
    with Evaluator(data_dir, device="cpu") as evaluator:
        cache, names = evaluator.decoded("test", CROP)
        assert names == [dataset.classes[label] for label in dataset.targets]
        ours = Embedder(loaded.model, batch_size=4).embed(cache.batches(4))
        nhwc = Embedder(loaded.model, batch_size=4, channels_last=True).embed(cache.batches(3))
    torch.testing.assert_close(ours @ ours.T, reference_similarity, atol=1e-5, rtol=0)
    torch.testing.assert_close(nhwc, ours, atol=1e-5, rtol=0)  # --channels-last: the same to float rounding
    torch.testing.assert_close(result["query_embeddings"], ours, atol=0, rtol=0)
    assert result["query_labels"] == dataset.targets

    reference_similarity.fill_diagonal_(float("-inf"))  # the query itself, excluded by index
    best = reference_similarity.max(dim=1, keepdim=True).values
    targets = torch.tensor(dataset.targets)
    for query, predicted in enumerate(result["predicted"]):
        near_best = reference_similarity[query] >= best[query] - 1e-5
        assert predicted in targets[near_best].tolist()
    expected = kimia_accuracy(dataset.targets, result["predicted"], num_classes=3)
    np.testing.assert_array_equal(result["confusion"], expected["confusion"])
    assert result["eta_total"] == pytest.approx(expected["eta_total"])
    assert result["num_queries"] == 9 and result["num_gallery"] == 9 and result["protocol"] == "test"
    assert result["num_lone_queries"] == 1  # s2's single image has nothing to find
    assert result["crop_size"] == CROP and result["class_names"] == list(CLASSES)


def test_train_protocol_searches_the_training_set(data_dir, tmp_path, write_checkpoint):
    path = tmp_path / "resnet50_MSLoss_0.5000.pth"
    write_checkpoint(path, "resnet50", crop_size=24, embedding_dim=64)
    loaded = load_model(path)
    assert loaded.crop_size == 24 and loaded.model.num_learners == 4
    with Evaluator(data_dir, batch_size=8, device="cpu") as evaluator:
        test, train = evaluator.evaluate(loaded, ("test", "train"))
    assert (test["protocol"], train["protocol"]) == ("test", "train")
    assert train["num_queries"] == 9 and train["num_gallery"] == 6 and train["num_lone_queries"] == 0
    assert train["confusion"].sum() == 9 and np.trace(train["confusion"]) == train["correct"]


def test_tsne_separates_well_separated_classes_and_is_seeded(tmp_path):
    generator = torch.Generator().manual_seed(3)
    centres = torch.nn.functional.normalize(torch.randn(3, 16, generator=generator), dim=1) * 4
    points = torch.cat([centre + 0.1 * torch.randn(12, 16, generator=generator) for centre in centres])
    labels = np.repeat(np.arange(3), 12)
    coordinates = evaluation.tsne_coordinates(points, seed=0)
    assert coordinates.shape == (36, 2)
    np.testing.assert_array_equal(coordinates, evaluation.tsne_coordinates(points, seed=0))
    distances = np.linalg.norm(coordinates[:, None] - coordinates[None], axis=2)
    same = labels[:, None] == labels[None]
    farthest_of_its_class = np.where(same & ~np.eye(36, dtype=bool), distances, -np.inf).max(axis=1)
    nearest_of_another = np.where(same, np.inf, distances).min(axis=1)
    # Every point lies nearer to each point of its class than to any point of another class.
    assert (farthest_of_its_class < nearest_of_another).all()
    path = tmp_path / "map.png"
    evaluation.plot_embeddings(path, coordinates, labels, ["s0", "s1", "s2"], "three classes")
    assert Image.open(path).size == tuple(round(x * evaluation.TSNE_DPI) for x in evaluation.TSNE_FIGURE_INCHES)
    with pytest.raises(UserError, match="at least 3 images"):
        evaluation.tsne_coordinates(points[:2])


def test_evaluate_feeds_any_encoder_its_own_input_steps_and_names_it(data_dir):
    """An encoder that resizes before its crop is embedded from the resized crop (Pillow's resize of the
    shorter side, then the centre), and every result names it: spec, kind, weights hash, input steps."""
    from dataclasses import replace

    from histo_retrieval.data.datasets import InputSteps
    from histo_retrieval.encoders import load_encoder

    steps = InputSteps(24, 30, "bicubic")
    encoder = replace(load_encoder("histogram", options={"bins": 4, "crop_size": 24}), input_steps=steps)
    with Evaluator(data_dir, batch_size=4, device="cpu") as evaluator:
        test, train = evaluator.evaluate(encoder, ("test", "train"))
        assert {key[1] for key in evaluator._splits} == {steps}  # decoded through the encoder's steps only
    dataset = KimiaDataset(data_dir / "test")
    expected = []
    for path, _ in dataset.samples:
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((30, 30), Image.Resampling.BICUBIC)  # square: the shorter side
        pixels = np.asarray(resized)[3:27, 3:27].reshape(-1, 3).astype(int) // 64  # 4 bins per channel
        counts = np.bincount((pixels[:, 0] * 4 + pixels[:, 1]) * 4 + pixels[:, 2], minlength=64).astype(float)
        expected.append(counts / np.linalg.norm(counts))
    np.testing.assert_allclose(test["query_embeddings"].numpy(), np.stack(expected), atol=1e-6, rtol=0)
    for result in (test, train):
        assert (result["encoder"], result["encoder_kind"], result["checkpoint"], result["crop_size"]) == (
            "histogram", "histogram", "histogram", 24)
        assert result["input_steps"] == {"crop_size": 24, "resize": 30, "interpolation": "bicubic"}
        assert result["weights_sha256"] == encoder.weights_sha256() != load_encoder("histogram").weights_sha256()
    assert train["num_gallery"] == 6 and test["num_queries"] == 9
