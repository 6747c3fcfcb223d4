"""Runs never overwrite or mix one another: the run identity in every file name, the selection grouped
by recorded settings, and the refusal of a folder that holds a run of the same identity."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
import train_traindata
from histo_retrieval.training import loop as training
from histo_retrieval.evaluation.checkpoint import save_torch_file, training_checkpoint
from histo_retrieval.distributed import run_distributed_script
from histo_retrieval.errors import UserError
from histo_retrieval.evaluation.selection import describe_checkpoint, select_checkpoints

# As tests/test_train.py: 64 px crops of 72 px images, batches of 6, one process, the CPU.
QUICK = ["--crop-size", "64", "--batch-size", "6", "--workers", "0", "--val-ratio", "0.25", "--device", "cpu"]
DEFAULT_SE = {"embedding_dim": 512, "num_learners": 1, "attention": True}
ABLATION_SE = {**DEFAULT_SE, "attention": False}
DEFAULT_MS = {"alpha": 2.0, "beta": 5.0, "lam": 0.5, "eps": 0.2, "self_pair": "reference"}


@pytest.fixture(autouse=True)
def one_thread() -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_images(root: Path, per_class: dict[str, int], size: int = 72) -> Path:
    rng = np.random.default_rng(0)
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        mean = rng.uniform(60, 200, 3)
        for i in range(count):
            pixels = np.clip(mean + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("KIMIA_data") / "train", {"s0": 12, "s1": 12})


def parse(*argv: object) -> object:
    return train.get_args_parser().parse_args([str(a) for a in argv])


def write_run_file(path: Path, val_loss: float, epoch: int, model_options: dict, loss_options: dict | None = None,
                   model_name: str = "se_resnet50", loss_name: str = "MSLoss", missing: tuple[str, ...] = ()) -> None:
    """A checkpoint from the library's own writer (a one-layer model stands in: the selection reads no
    weights); `missing` drops keys, as an older checkpoint lacks them."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = {"model_name": model_name, "loss_name": loss_name, "model_options": model_options,
           "loss_options": DEFAULT_MS if loss_options is None else loss_options, "class_names": ["s0", "s1"],
           "history": [{"epoch": epoch, "val_loss": val_loss}], "best_val_loss": val_loss,
           "train_files": {"count": 18, "sha256": "0" * 64}, "command": "python3 train.py"}
    content = training_checkpoint(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1), None, epoch,
                                  {"crop_size": 64, "seed": 1}, run)
    for key in missing:
        content.pop(key)
    save_torch_file(content, path)


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """{name: (SHA-256, mtime in ns)} of every file in `folder`."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def stub_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    """No training or validation pass (each epoch's loss is 0.5): the epoch loop writes its files in a
    fraction of a second, and a run the code under test fails to refuse ends quickly."""
    def train_one_epoch(model, criterion, optimizer, loader, device, args, scaler, epoch, show_progress):
        return {"train_loss": 1.0, "skipped_batches": 0, "train_batches": len(loader), "nonfinite_batches": 0,
                "images_per_s": 1.0, "unreadable": []}

    monkeypatch.setattr(train, "train_one_epoch", train_one_epoch)
    monkeypatch.setattr(train, "validate", lambda *args: (0.5, []))


# ----------------------------------------------------------------------------- the identity


@pytest.mark.parametrize("flags, identity", [
    ([], "se_resnet50_MSLoss"),
    (["--num-learners", "1", "--ms-alpha", "2"], "se_resnet50_MSLoss"),  # the defaults, spelt out
    (["--no-attention"], "se_resnet50-noattention_MSLoss"),
    (["--embedding-dim", "128", "--self-pair", "exclude"], "se_resnet50-embeddingdim128_MSLoss-selfpairexclude"),
    (["--ms-eps", "0.1", "--margin", "0.9"], "se_resnet50_MSLoss-eps0.1"),  # --margin is ContrastiveLoss's only
])
def test_the_commands_identity_from_its_flags(flags: list[str], identity: str) -> None:
    assert training.resolve_names(parse("se_resnet50", "MSLoss", *flags)).identity == identity


# ----------------------------------------------------------------------------- selection
def test_selection_groups_runs_by_their_recorded_settings_not_their_names(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    write_run_file(folder / "se_resnet50_MSLoss_0.5000.pth", 0.5, 0, DEFAULT_SE)
    write_run_file(folder / "se_resnet50_MSLoss_0.4000.pth", 0.4, 1, DEFAULT_SE)
    # An older checkpoint of the main run, without loss options and with partial model options.
    write_run_file(folder / "se_resnet50_MSLoss_0.4500.pth", 0.45, 0, {"embedding_dim": 512}, missing=("loss_options",))
    write_run_file(folder / "checkpoint.pth", 0.45, 2, DEFAULT_SE)
    # The ablation as train.py named it before the identity: the main run's name, its lowest loss.
    write_run_file(folder / "se_resnet50_MSLoss_0.3000.pth", 0.3, 0, ABLATION_SE)
    write_run_file(folder / "se_resnet50-noattention_MSLoss_0.2000.pth", 0.2, 1, ABLATION_SE)
    write_run_file(folder / "se_resnet50-noattention_MSLoss_checkpoint.pth", 0.1, 2, ABLATION_SE)
    # Bare state_dicts (--save-bare-state-dict, the reference's): the run from the name and the keys.
    torch.save({"layer4.0.conv1.weight": torch.zeros(1)}, folder / "se_resnet50_MSLoss_0.3500.pth")  # no att_layer.
    torch.save({"att_layer.conv.weight": torch.zeros(1)}, folder / "se_resnet_MsLoss_0.1000.pth")

    paths = sorted(folder.iterdir())
    runs = {p.name: describe_checkpoint(p).run for p in paths}
    assert runs == {"checkpoint.pth": "se_resnet50_MSLoss",
                    "se_resnet50_MSLoss_0.3500.pth": "se_resnet50-noattention_MSLoss",
                    "se_resnet_MsLoss_0.1000.pth": "se_resnet_MsLoss",
                    "se_resnet50-noattention_MSLoss_0.2000.pth": "se_resnet50-noattention_MSLoss",
                    "se_resnet50-noattention_MSLoss_checkpoint.pth": "se_resnet50-noattention_MSLoss",
                    "se_resnet50_MSLoss_0.3000.pth": "se_resnet50-noattention_MSLoss",
                    "se_resnet50_MSLoss_0.4000.pth": "se_resnet50_MSLoss",
                    "se_resnet50_MSLoss_0.4500.pth": "se_resnet50_MSLoss",
                    "se_resnet50_MSLoss_0.5000.pth": "se_resnet50_MSLoss"}
    labels = {p.name: label for p, label in select_checkpoints(paths).items()}
    assert labels == {"checkpoint.pth": "last_epoch",
                      "se_resnet50-noattention_MSLoss_0.2000.pth": "validation",
                      "se_resnet50-noattention_MSLoss_checkpoint.pth": "last_epoch",  # never a selection
                      "se_resnet50_MSLoss_0.3000.pth": "",
                      "se_resnet50_MSLoss_0.4000.pth": "validation",  # the main run's result, not the ablation's
                      "se_resnet50_MSLoss_0.4500.pth": "",
                      "se_resnet50_MSLoss_0.5000.pth": "",
                      "se_resnet50_MSLoss_0.3500.pth": "",
                      "se_resnet_MsLoss_0.1000.pth": "validation"}  # the reference's spelling: a run of its own
    # train_traindata.py --main-weights: the paper's 100% bar is the main run, never the ablation.
    assert train_traindata.selected_checkpoint(folder, "se_resnet50_MSLoss") == folder / "se_resnet50_MSLoss_0.4000.pth"
    assert train_traindata.selected_checkpoint(folder, "se_resnet50-noattention_MSLoss") == \
        folder / "se_resnet50-noattention_MSLoss_0.2000.pth"
    with pytest.raises(UserError, match=r"expected one se_resnet50-embeddingdim128_MSLoss_<val_loss>\.pth run, found none"):
        train_traindata.selected_checkpoint(folder, "se_resnet50-embeddingdim128_MSLoss")


# ----------------------------------------------------------------------------- refusing a folder
def test_a_new_run_refuses_a_folder_holding_a_run_of_its_identity(data: Path, tmp_path: Path, stub_epochs: None,
                                                                   capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    write_run_file(folder / "se_resnet50_MSLoss_0.4000.pth", 0.4, 0, DEFAULT_SE)
    write_run_file(folder / "se_resnet50_MSLoss_checkpoint.pth", 0.4, 0, DEFAULT_SE)
    (folder / "se_resnet50_MSLoss_log.csv").write_text("epoch,train_loss,val_loss\n0,1.0,0.4\n")
    before = snapshot(folder)
    common = ["se_resnet50", "MSLoss", "--data-dir", data, "--output-dir", folder, "--epochs", 1, *QUICK]
    # The same command again, and one with other settings under the same identity: both refused.
    for extra in ([], ["--lr", "0.01"]):
        assert run_distributed_script(train.command, parse(*common, *extra)) == 2
        err = capsys.readouterr().err
        assert err.splitlines() == [
            f"error: {folder} already holds a se_resnet50_MSLoss run (se_resnet50_MSLoss_log.csv and 2 more), which "
            f"this run would overwrite; pass --resume {folder / 'se_resnet50_MSLoss_checkpoint.pth'} to continue it, or a "
            "new --output-dir"]
        assert snapshot(folder) == before
    # Another identity (the ablation) is no overwrite. (--resume skips the check: tests/test_train.py resumes
    # into the folder it continues.)
    training.refuse_other_run(training.RunFiles(folder, "se_resnet50-noattention_MSLoss"))


def test_only_the_runs_own_last_epoch_file_counts(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    # Each run has a last-epoch file of its own; the shared checkpoint.pth of earlier versions is nobody's.
    write_run_file(folder / "ABE_M_ABELoss_checkpoint.pth", 0.4, 0, {"embedding_dim": 512, "num_learners": 4},
                   model_name="ABE_M", loss_name="ABELoss", loss_options={})
    write_run_file(folder / "checkpoint.pth", 0.4, 0, DEFAULT_SE)
    assert training.RunFiles(folder, "se_resnet50_MSLoss").existing() == []
    assert training.RunFiles(folder, "ABE_M_ABELoss").existing() == [folder / "ABE_M_ABELoss_checkpoint.pth"]
    write_run_file(folder / "se_resnet50-noattention_MSLoss_checkpoint.pth", 0.4, 0, ABLATION_SE)
    assert training.RunFiles(folder, "se_resnet50-noattention_MSLoss").existing() == [
        folder / "se_resnet50-noattention_MSLoss_checkpoint.pth"]
    assert training.RunFiles(folder, "se_resnet50-noattention_MSLoss").last_epoch.name == \
        "se_resnet50-noattention_MSLoss_checkpoint.pth"
    assert training.RunFiles(folder, "se_resnet50_MSLoss").last_epoch.name == "se_resnet50_MSLoss_checkpoint.pth"


@pytest.mark.slow
def test_the_main_run_and_its_ablation_share_a_folder_without_touching_each_other(data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    common = ["se_resnet50", "MSLoss", "--data-dir", data, "--output-dir", folder, "--epochs", 1, *QUICK]
    main_run = train.main(parse(*common))
    main_files = snapshot(folder)
    best = Path(main_run["best_checkpoint"]).name
    assert set(main_files) == {"se_resnet50_MSLoss_checkpoint.pth", best, "se_resnet50_MSLoss_log.csv",
                               "se_resnet50_MSLoss_loss.png"}
    assert best == f"se_resnet50_MSLoss_{main_run['best_val_loss']:.4f}.pth"

    ablation = train.main(parse(*common, "--no-attention"))
    ablation_best = Path(ablation["best_checkpoint"]).name
    assert ablation_best == f"se_resnet50-noattention_MSLoss_{ablation['best_val_loss']:.4f}.pth"
    after = snapshot(folder)
    assert {name: after[name] for name in main_files} == main_files  # the main run's files untouched
    assert set(after) - set(main_files) == {ablation_best, "se_resnet50-noattention_MSLoss_checkpoint.pth",
                                            "se_resnet50-noattention_MSLoss_log.csv",
                                            "se_resnet50-noattention_MSLoss_loss.png"}
    last = torch.load(folder / "se_resnet50-noattention_MSLoss_checkpoint.pth", map_location="cpu", weights_only=True)
    assert last["model_options"] == ABLATION_SE and last["epoch"] == 0

    labels = {p.name: label for p, label in select_checkpoints(sorted(folder.glob("*.pth"))).items()}
    assert labels == {best: "validation", ablation_best: "validation", "se_resnet50_MSLoss_checkpoint.pth": "last_epoch",
                      "se_resnet50-noattention_MSLoss_checkpoint.pth": "last_epoch"}
    assert describe_checkpoint(folder / best).run == "se_resnet50_MSLoss"
    assert describe_checkpoint(folder / ablation_best).run == "se_resnet50-noattention_MSLoss"
    assert train_traindata.selected_checkpoint(folder, "se_resnet50_MSLoss") == folder / best

    with pytest.raises(UserError, match=r"already holds a se_resnet50-noattention_MSLoss run .*--resume "
                                        r".*se_resnet50-noattention_MSLoss_checkpoint\.pth"):
        train.main(parse(*common, "--no-attention"))
    assert snapshot(folder) == after
