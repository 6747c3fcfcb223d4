"""histo_retrieval.evaluation.selection: the validation-selected checkpoint of each run, and the
validation loss of a file from its dict or its name."""
from pathlib import Path

import torch

from histo_retrieval.evaluation import selection


def tiny_checkpoint(path: Path, val_loss: float | None, best_val_loss: float | None = None, epoch: int = 0,
                    model_name: str = "se_resnet50", loss_name: str = "MSLoss") -> None:
    """A train.py-style dict with a one-tensor model: enough for the selection, which reads no weights."""
    content = {"model": {"w": torch.zeros(1)}, "model_name": model_name, "loss_name": loss_name, "epoch": epoch,
               "best_val_loss": val_loss if best_val_loss is None else best_val_loss}
    if val_loss is not None:
        content["val_loss"] = val_loss
    torch.save(content, path)


def test_select_checkpoints_labels_the_newest_best_of_each_run(tmp_path):
    folder, other, last_only = tmp_path / "model", tmp_path / "other", tmp_path / "last_only"
    for f in (folder, other, last_only):
        f.mkdir()
    tiny_checkpoint(folder / "se_resnet50_MSLoss_0.5000.pth", 0.5, epoch=0)
    tiny_checkpoint(folder / "se_resnet50_MSLoss_0.3000.pth", 0.3, epoch=3)
    tiny_checkpoint(folder / "checkpoint.pth", 0.4, best_val_loss=0.3, epoch=5)
    (folder / "se_resnet50_MSLoss_0.0100.pth").write_bytes(b"truncated")  # unreadable: its name is no candidate
    # Equal losses (two runs into one folder): the later epoch, although its name sorts after.
    tiny_checkpoint(folder / "ABE_M_ABELoss_0.2000.pth", 0.2, epoch=1, model_name="ABE_M", loss_name="ABELoss")
    tiny_checkpoint(folder / "ABE_M_ABELoss_0.2000_resumed.pth", 0.2, epoch=4, model_name="ABE_M", loss_name="ABELoss")
    for name in ("se_resnet_MsLoss_0.7590.pth", "se_resnet_MsLoss_0.6000.pth", "0.2se_resnet_MsLoss_0.9000.pth",
                 "se_resnet_MsLoss_final.pth"):
        torch.save({"conv.weight": torch.zeros(1)}, folder / name)  # the reference's bare state_dicts
    tiny_checkpoint(other / "se_resnet50_MSLoss_0.9000.pth", 0.9)  # another folder: its own run
    tiny_checkpoint(last_only / "checkpoint.pth", 0.3)  # the last epoch is never a selection, even when best

    paths = sorted(folder.iterdir()) + [str(other / "se_resnet50_MSLoss_0.9000.pth"), last_only / "checkpoint.pth"]
    labels = selection.select_checkpoints(paths)
    assert list(labels) == paths  # keys as given, str or Path
    assert {str(Path(k).relative_to(tmp_path)): v for k, v in labels.items()} == {
        "model/se_resnet50_MSLoss_0.5000.pth": "",
        "model/se_resnet50_MSLoss_0.3000.pth": "validation",
        "model/checkpoint.pth": "last_epoch",
        "model/se_resnet50_MSLoss_0.0100.pth": "",
        "model/ABE_M_ABELoss_0.2000.pth": "",
        "model/ABE_M_ABELoss_0.2000_resumed.pth": "validation",
        "model/se_resnet_MsLoss_0.7590.pth": "",
        "model/se_resnet_MsLoss_0.6000.pth": "validation",
        "model/0.2se_resnet_MsLoss_0.9000.pth": "validation",  # the ratio prefix makes its own run
        "model/se_resnet_MsLoss_final.pth": "",
        "other/se_resnet50_MSLoss_0.9000.pth": "validation",
        "last_only/checkpoint.pth": "last_epoch",
    }


def test_validation_loss_from_the_dict_else_the_name(tmp_path):
    tiny_checkpoint(tmp_path / "se_resnet50_MSLoss_0.3000.pth", 0.30001234)
    tiny_checkpoint(tmp_path / "se_resnet50_MSLoss_0.2500.pth", None)  # a dict without the key
    tiny_checkpoint(tmp_path / "renamed.pth", None)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "se_resnet_MsLoss_0.7590.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "se_resnet_MsLoss_best.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "se_resnet_MsLoss_0.4200.pth",
               _use_new_zipfile_serialization=False)  # the legacy format, which cannot be memory-mapped
    (tmp_path / "se_resnet_MsLoss_0.1000.pth").write_bytes(b"truncated")
    assert selection.validation_loss(tmp_path / "se_resnet50_MSLoss_0.3000.pth") == 0.30001234  # unrounded
    assert selection.validation_loss(tmp_path / "se_resnet50_MSLoss_0.2500.pth") == 0.25
    assert selection.validation_loss(tmp_path / "se_resnet_MsLoss_0.7590.pth") == 0.759
    assert selection.validation_loss(tmp_path / "se_resnet_MsLoss_0.4200.pth") == 0.42
    for name in ("renamed.pth", "se_resnet_MsLoss_best.pth", "se_resnet_MsLoss_0.1000.pth"):
        assert selection.validation_loss(tmp_path / name) is None, name
    described = selection.describe_checkpoint(tmp_path / "se_resnet_MsLoss_best.pth")
    assert (described.run, described.candidate) == ("", False)
