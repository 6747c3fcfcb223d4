"""histo_retrieval.evaluation.protocols: the test (leave-one-out) and train protocols against the
reference's pipeline, and the t-SNE map."""
from pathlib import Path

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


# ----------------------------------------------------------------------------- --groups
def write_groups(path, rows, header="image,group"):
    path.write_text(header + "\n" + "".join(f"{image},{group}\n" for image, group in rows), encoding="utf-8")
    return path


def test_read_groups_names_images_three_ways_and_records_the_file(data_dir, tmp_path):
    import hashlib

    from histo_retrieval.data.datasets import read_groups

    rows = [("test/s0/s0_0.png", "A"), ("test/s0/s0_1.png", "A"), ("s0_2.png", "B"), ("test/s0/s0_3.png", "B"),
            ("test/s1/s1_0.png", "C"), ("test/s1/s1_1.png", "C"), ("s1/s1_2.png", "D"), ("s1/s1_3.png", "D"),
            ("test/s2/s2_0.png", "E"), ("elsewhere/x.png", "Z")]
    path = write_groups(tmp_path / "groups.csv", rows)
    groups = read_groups(path, data_dir, ("test",))
    assert groups.by_image == {"test/s0/s0_0.png": "A", "test/s0/s0_1.png": "A", "test/s0/s0_2.png": "B",
                               "test/s0/s0_3.png": "B", "test/s1/s1_0.png": "C", "test/s1/s1_1.png": "C",
                               "test/s1/s1_2.png": "D", "test/s1/s1_3.png": "D", "test/s2/s2_0.png": "E"}
    assert groups.unmatched_rows == 1 and not groups.covers("train") and groups.covers("test")
    assert groups.record() == {"groups": str(path), "num_groups": 5,
                               "groups_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    # With train/ read too: s0_2.png and s1/s1_2.png stay unique (train/ holds <class>_0 and <class>_1
    # only), and a training set without any group is allowed (nothing of it excluded).
    assert read_groups(path, data_dir, ("test", "train")).by_image == groups.by_image
    # s1/s1_0.png names test/s1/s1_0.png alone when test/ is read, but train/s1/s1_0.png as well otherwise.
    rows[4] = ("s1/s1_0.png", "C")
    with pytest.raises(UserError, match=r"line 6: s1/s1_0\.png names 2 images of test/, train/; write its path "
                                        r"under the data folder \(<split>/<class>/<file>\)"):
        read_groups(write_groups(tmp_path / "short.csv", rows), data_dir, ("test", "train"))


def test_read_groups_refuses_missing_images_and_bad_rows_in_one_line(data_dir, tmp_path):
    from histo_retrieval.data.datasets import read_groups

    complete = [(f"test/{Path(p).parent.name}/{Path(p).name}", Path(p).stem)
                for p, _ in KimiaDataset(data_dir / "test").samples]
    missing = write_groups(tmp_path / "missing.csv", [row for row in complete if "s1" not in row[0]])
    with pytest.raises(UserError, match=r"^--groups .*missing\.csv: no group for 4 of the 9 images of .*test, "
                                        r"the first test/s1/s1_0\.png; add a row image,group for each"):
        read_groups(missing, data_dir)
    partial_train = write_groups(tmp_path / "partial.csv", complete + [("train/s0/s0_0.png", "x")])
    with pytest.raises(UserError, match=r"no group for 5 of the 6 images of .*train, the first train/s0/s0_1\.png"):
        read_groups(partial_train, data_dir, ("test", "train"))
    ambiguous = write_groups(tmp_path / "ambiguous.csv", complete[1:] + [("s0_0.png", "x")])
    with pytest.raises(UserError, match=r"line 10: s0_0\.png names 2 images of test/, train/"):
        read_groups(ambiguous, data_dir, ("test", "train"))
    twice = write_groups(tmp_path / "twice.csv", complete + [complete[0]])
    with pytest.raises(UserError, match=r"line 11 lists test/s0/s0_0\.png again \(first on line 2\)"):
        read_groups(twice, data_dir)
    with pytest.raises(UserError, match=r"line 3 has an empty group"):
        read_groups(write_groups(tmp_path / "empty.csv", [complete[0], (complete[1][0], "")]), data_dir)
    with pytest.raises(UserError, match=r"no column group; the CSV needs a header image,group"):
        read_groups(write_groups(tmp_path / "header.csv", complete, header="image,slide"), data_dir)
    with pytest.raises(UserError, match=r"--groups .*absent\.csv: no such file"):
        read_groups(tmp_path / "absent.csv", data_dir)


def naive_grouped_eta_p(queries, query_groups, query_labels, gallery, gallery_groups, gallery_labels):
    """eta_p of nearest-neighbour search outside the query's group, by a plain loop over every pair."""
    correct = 0
    for q, group, label in zip(queries, query_groups, query_labels):
        pairs = [(float(q @ g), j) for j, g in enumerate(gallery) if gallery_groups[j] != group]
        correct += gallery_labels[max(pairs, key=lambda p: (p[0], -p[1]))[1]] == label
    return correct / len(queries)


def test_evaluate_with_groups_excludes_the_querys_group_in_both_protocols(data_dir, tmp_path):
    from histo_retrieval.data.datasets import read_groups
    from histo_retrieval.encoders import load_encoder

    encoder = load_encoder("histogram", options={"bins": 4, "crop_size": 32})
    test_images = [f"test/{name}" for name in ("s0/s0_0.png", "s0/s0_1.png", "s0/s0_2.png", "s0/s0_3.png",
                                               "s1/s1_0.png", "s1/s1_1.png", "s1/s1_2.png", "s1/s1_3.png",
                                               "s2/s2_0.png")]
    train_images = [f"train/s{c}/s{c}_{i}.png" for c in range(3) for i in range(2)]
    slides = dict(zip(test_images, ["a", "a", "b", "c", "b", "c", "d", "d", "e"]))
    slides.update(zip(train_images, ["a", "f", "b", "g", "e", "h"]))  # slides a, b, e also in the training set
    path = write_groups(tmp_path / "slides.csv", slides.items())
    groups = read_groups(path, data_dir, ("test", "train"))
    with Evaluator(data_dir, batch_size=4, device="cpu") as evaluator:
        plain_test, plain_train = evaluator.evaluate(encoder, ("test", "train"))
    with Evaluator(data_dir, batch_size=4, device="cpu", groups=groups) as evaluator:
        test, train = evaluator.evaluate(encoder, ("test", "train"))
    assert (test["exclusion"], train["exclusion"]) == ("group", "group")
    assert evaluation.protocol_label(test) == "test-groups" and evaluation.protocol_label(train) == "train-groups"
    assert evaluation.protocol_label(plain_test) == "test" and plain_test["exclusion"] == "query"
    assert plain_train["exclusion"] == "none" and plain_test["groups"] == ""
    assert test["groups"] == str(path) and test["num_groups"] == 8 and len(test["groups_sha256"]) == 64
    queries = test["query_embeddings"].numpy()
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 2]
    query_groups = [slides[image] for image in test_images]
    assert test["eta_p"] == pytest.approx(naive_grouped_eta_p(queries, query_groups, labels, queries, query_groups,
                                                              labels), abs=1e-12)
    with Evaluator(data_dir, batch_size=4, device="cpu") as evaluator:  # the training embeddings, the same way
        cache, _ = evaluator.decoded("train", encoder.input_steps)
        gallery = Embedder(encoder.model, evaluator.device, 4, "off", False, encoder.preprocessing).embed(
            cache.batches(4)).numpy()
    gallery_groups = [slides[image] for image in train_images]
    assert train["eta_p"] == pytest.approx(naive_grouped_eta_p(queries, query_groups, labels, gallery, gallery_groups,
                                                               [0, 0, 1, 1, 2, 2]), abs=1e-12)
    assert train["num_gallery"] == 6


def test_evaluate_with_one_group_per_image_or_per_class(data_dir, tmp_path):
    from histo_retrieval.data.datasets import read_groups
    from histo_retrieval.encoders import load_encoder

    encoder = load_encoder("histogram", options={"bins": 4, "crop_size": 32})
    images = [f"{s}/{p.parent.name}/{p.name}" for s in ("test", "train")
              for p in (Path(x) for x, _ in KimiaDataset(data_dir / s).samples)]
    per_image = read_groups(write_groups(tmp_path / "image.csv", [(i, i) for i in images]), data_dir, ("test", "train"))
    per_class = read_groups(write_groups(tmp_path / "class.csv", [(i, i.split("/")[1]) for i in images[:9]]),
                            data_dir, ("test",))
    with Evaluator(data_dir, batch_size=4, device="cpu") as evaluator:
        plain = evaluator.evaluate(encoder, ("test", "train"))
    with Evaluator(data_dir, batch_size=4, device="cpu", groups=per_image) as evaluator:
        grouped = evaluator.evaluate(encoder, ("test", "train"))
    for ours, paper in zip(grouped, plain):
        for key in ("eta_p", "eta_w", "eta_total", "recall@1", "map@r", "num_lone_queries", "num_gallery"):
            assert ours[key] == paper[key] or (np.isnan(ours[key]) and np.isnan(paper[key])), key
    with Evaluator(data_dir, batch_size=4, device="cpu", groups=per_class) as evaluator:
        test, train = evaluator.evaluate(encoder, ("test", "train"))
    assert test["eta_p"] == 0.0 and test["exclusion"] == "group"
    # The file gives no training group: the training set is searched whole, and the result says so.
    assert train["exclusion"] == "none" and train["groups"] == str(tmp_path / "class.csv")
    assert evaluation.protocol_label(train) == "train" and train["eta_p"] == plain[1]["eta_p"]
