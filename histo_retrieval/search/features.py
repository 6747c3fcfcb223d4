"""Patch features written in the layout of CLAM and TRIDENT, for multiple-instance-learning tools.

    plan = plan_export(["a.svs", "b.svs", "patches/"], "features/")   # refuses two sources of one name
    report = export_features(plan, encoder, embedder, Tiling(0.5, 224, 0.5), workers=4)   # retrieve.py embed

A whole slide gives `features/<slide stem>.h5`: `features` (float32, N x D, the L2-normalised vectors
an index would hold) and `coords` (int64, N x 2, the level-0 top-left corners of its tissue patches),
with the tiling, the encoder and the command as attributes. A folder of patch images gives
`features/<folder name>.h5`: `features`, `files` (paths relative to the folder) and `classes`
(first-level subfolder of each file) when it has class subfolders. Reading, tissue detection and
batching are the indexing code's (histo_retrieval.search.indexing.embed_sources). Each file is
written to a temporary name and renamed, so a killed run keeps the files it finished; a rerun
skips them, and `embed.json` records the run and every file the folder holds.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from histo_retrieval.encoders.base import Encoder
from histo_retrieval.errors import UserError
from histo_retrieval.evaluation.embedder import Embedder
from histo_retrieval.files import atomic_write, atomic_write_text, command_line
from histo_retrieval.search.indexing import MISSING, Job, SourceResult, embed_sources, source_jobs
from histo_retrieval.search.slides import Tiling

__all__ = ["FORMAT", "SUMMARY", "ExportPlan", "ExportReport", "export_features", "feature_settings", "output_name",
           "plan_export"]

FORMAT = 1  # of the .h5 files and embed.json
SUMMARY = "embed.json"
# Microns per pixel of a 10x objective's image: magnification = 10 / mpp (0.5 um/px is 20x), as TRIDENT records it.
MAGNIFICATION_MICRONS = 10.0


def output_name(job: Job) -> str:
    """The name of a job's file without `.h5`: a slide's stem, a folder's name."""
    return Path(job.path).name if job.kind == "files" else Path(job.path).stem


@dataclass
class ExportPlan:
    """The jobs of a run with the file each writes, and the sources that are not there."""
    directory: Path
    jobs: list[Job]
    outputs: list[Path]
    missing: list[tuple[str, str]] = field(default_factory=list)


def plan_export(sources: Sequence[str], directory: str | os.PathLike) -> ExportPlan:
    """A job and an output file for each source; UserError when none is there, or when two sources
    would write the same file (one would overwrite the other). Nothing is written."""
    directory = Path(directory)
    jobs, missing = source_jobs(sources)
    if not jobs:
        what = MISSING if len(sources) == 1 else "none of these slides, images or folders exists"
        names = ", ".join(sources[:3]) + (", ..." if len(sources) > 3 else "")
        raise UserError(f"{names}: {what}; nothing to embed, {directory} not created or changed")
    owners: dict[str, Job] = {}
    for job in jobs:
        key = output_name(job).casefold()  # case-insensitive file systems would take one for the other
        if key in owners:
            raise UserError(f"{owners[key].path} and {job.path} would both write {directory / output_name(job)}.h5; "
                            "rename one, or embed them into separate --out-dir folders")
        owners[key] = job
    return ExportPlan(directory, jobs, [directory / f"{output_name(job)}.h5" for job in jobs], missing)


def feature_settings(encoder: Encoder, tiling: Tiling, amp: str) -> dict[str, Any]:
    """What makes the numbers of a run: a folder holds the features of one set of these."""
    return {"encoder": encoder.spec, "weights_sha256": encoder.weights_sha256(), "model_name": encoder.model_name,
            "model_options": encoder.model_options, "pooling": encoder.pooling,
            "input_steps": encoder.input_steps.to_dict(), "preprocessing": encoder.preprocessing.to_dict(),
            "mpp": tiling.mpp, "patch_size": tiling.patch_size, "tissue_threshold": tiling.tissue_threshold,
            "amp": amp}


def _versions() -> dict[str, str]:
    """The installed versions of what makes the numbers (read from the packages' metadata)."""
    versions = {}
    for package in ("histo-retrieval", "torch", "timm", "numpy", "h5py"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _jsonable(value: Any) -> Any:
    """Settings as JSON sees them (tuples as lists), so that a file's and a run's compare equal."""
    return json.loads(json.dumps(value, default=str))


def _differences(recorded: dict, settings: dict) -> list[str]:
    settings = _jsonable(settings)
    return [f"{key} {recorded.get(key)!r} there, {settings[key]!r} now" for key in settings
            if recorded.get(key) != settings[key]]


def _file_settings(path: Path) -> dict:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs["settings"])
    except (OSError, KeyError, ValueError) as error:
        raise UserError(f"{path}: not a features file of this tool ({error}); move it away, or pass --replace "
                        "to write it again") from None


@dataclass
class ExportReport:
    written: list[tuple[str, Path, int]] = field(default_factory=list)  # (source, file, patches)
    skipped: list[tuple[str, Path]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    unreadable_files: list[tuple[str, str]] = field(default_factory=list)


class _Summary:
    """embed.json: the folder's settings, its runs' commands, and each file it holds."""

    def __init__(self, directory: Path, encoder: Encoder, settings: dict) -> None:
        self.path = directory / SUMMARY
        self.data = {"format": FORMAT, "settings": _jsonable(settings), "encoder": encoder.describe(),
                     "weights": encoder.path, "runs": [], "outputs": {}}
        if self.path.is_file():
            try:
                earlier = json.loads(self.path.read_text(encoding="utf-8"))
                recorded = earlier["settings"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise UserError(f"{self.path}: cannot be read ({error}); move it away or choose another "
                                "--out-dir") from None
            differences = _differences(recorded, settings)
            if differences:
                raise UserError(f"{directory}: holds features made with other settings; refusing to mix: "
                                + "; ".join(differences) + "; choose another --out-dir")
            self.data["runs"], self.data["outputs"] = earlier.get("runs", []), earlier.get("outputs", {})
        self.run = {"command": command_line(), "started": _now(), "versions": _versions(), "failed": {}}
        self.data["runs"].append(self.run)

    def add(self, name: str, entry: dict) -> None:
        self.data["outputs"][name] = entry
        self.save()

    def fail(self, path: str, reason: str) -> None:
        self.run["failed"][path] = reason

    def save(self) -> None:
        self.data["command"] = self.run["command"]
        outputs = self.data["outputs"]  # the files the folder holds: one deleted since is dropped
        self.data["outputs"] = {name: entry for name, entry in outputs.items()
                                if (self.path.parent / entry["file"]).is_file()}
        atomic_write_text(self.path, json.dumps(self.data, indent=1) + "\n")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _remove_leftovers(directory: Path, names: Sequence[str]) -> None:
    """Delete the temporary files a killed run left for `names` (atomic_write's `.<name>.XXXX.tmp`)."""
    if not directory.is_dir():
        return
    wanted = re.compile(r"\.(" + "|".join(re.escape(n) for n in names) + r")\.[^/]*\.tmp")
    for entry in directory.iterdir():
        if wanted.fullmatch(entry.name) and entry.is_file():
            entry.unlink()


def _attributes(result: SourceResult, encoder: Encoder, tiling: Tiling, settings: dict, run: dict) -> dict:
    """The file's attributes: enough to read it, and to make it again."""
    attrs = {"format": FORMAT, "source": result.job.path, "kind": "folder" if result.job.kind == "files" else "slide",
             "encoder": encoder.spec, "encoder_description": encoder.describe(), "weights_sha256":
                 settings["weights_sha256"], "encoder_weights": encoder.path, "dim": int(result.vectors.shape[1]),
             "input_steps": encoder.input_steps.describe(), "command": run["command"],
             "created": _now(), "versions": json.dumps(run["versions"]), "settings": json.dumps(_jsonable(settings))}
    if result.job.kind == "slide":
        info = result.info
        attrs.update(mpp=tiling.mpp, patch_size=tiling.patch_size,
                     patch_size_level0=tiling.level0_size(info["slide_mpp"]),
                     tissue_threshold=tiling.tissue_threshold, slide_mpp=info["slide_mpp"],
                     level0_width=info["width"], level0_height=info["height"], reader=info["backend"])
    return attrs


def _write(path: Path, result: SourceResult, attrs: dict) -> None:
    import h5py

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=np.ascontiguousarray(result.vectors, np.float32))
            if result.job.kind == "slide":
                coords = f.create_dataset("coords", data=np.ascontiguousarray(result.boxes[:, :2], np.int64))
                # TRIDENT's readers take the patch's scale from the coords' attributes, CLAM's from the file's
                coords.attrs.update(patch_size=attrs["patch_size"], patch_size_level0=attrs["patch_size_level0"],
                                    target_magnification=MAGNIFICATION_MICRONS / attrs["mpp"],
                                    level0_magnification=MAGNIFICATION_MICRONS / attrs["slide_mpp"], overlap=0,
                                    name=Path(result.job.path).stem)
            else:
                root = result.job.path
                text = h5py.string_dtype("utf-8")
                f.create_dataset("files", data=[Path(os.path.relpath(p, root)).as_posix() for p in result.files],
                                 dtype=text)
                if any(c is not None for c in result.classes):
                    f.create_dataset("classes", data=[c or "" for c in result.classes], dtype=text)
            f.attrs.update(attrs)

    atomic_write(path, write)


def export_features(plan: ExportPlan, encoder: Encoder, embedder: Embedder, tiling: Tiling, workers: int = 0,
                    fallback_mpp: float | None = None, replace: bool = False, progress: bool = True) -> ExportReport:
    """Write the features of every planned source whose file is not there yet (with `replace`, of
    every source), each as soon as it is embedded. Existing files made with other settings are
    refused before anything is embedded; a source that cannot be read is reported in `failed`."""
    tiling.check()
    settings = feature_settings(encoder, tiling, embedder.amp)
    report = ExportReport(failed=list(plan.missing))
    todo, paths = [], {}
    for job, path in zip(plan.jobs, plan.outputs):
        if path.is_file() and not replace:
            differences = _differences(_file_settings(path), settings)
            if differences:
                raise UserError(f"{path}: made with other settings ({'; '.join(differences)}); pass --replace to "
                                "write it again, or choose another --out-dir")
            report.skipped.append((job.path, path))
            continue
        if job.kind == "files" and not job.files:
            report.failed.append((job.path, "no image files in this folder or its subfolders"))
            continue
        todo.append(job)
        paths[job.path] = path
    summary = _Summary(plan.directory, encoder, settings)  # refuses a folder of other settings, writes nothing yet
    for source, path in report.skipped:
        print(f"{source}: {path} exists, skipped (--replace writes it again)")
    _remove_leftovers(plan.directory, [p.name for p in plan.outputs] + [SUMMARY])
    for result in embed_sources(todo, embedder, tiling, encoder.input_steps, workers, fallback_mpp, progress):
        report.unreadable_files += result.failed
        source = result.job.path
        if result.error is None and result.job.kind == "files" and not len(result.files):
            result.error = "none of its images could be read"
        if result.error is not None:
            report.failed.append((source, result.error))
            continue
        if not len(result.vectors):  # a slide without tissue: an empty file, so that a rerun skips it too
            result.vectors = np.zeros((0, encoder.dim), np.float32)
        path = paths[source]
        _write(path, result, _attributes(result, encoder, tiling, settings, summary.run))
        summary.add(path.stem, {"file": path.name, "source": source, "kind": "folder" if result.job.kind == "files"
                                else "slide", "patches": len(result.vectors), "written": _now(),
                                "command": summary.run["command"]})
        report.written.append((source, path, len(result.vectors)))
    for source, reason in report.failed:
        summary.fail(source, reason)
    if report.written or report.skipped or summary.path.is_file():  # a run that read nothing creates nothing
        summary.save()
    return report


def print_report(report: ExportReport, directory: Path) -> None:
    """The end of `retrieve.py embed`: what was written, then what failed (stderr)."""
    print(f"wrote {len(report.written)} file(s), {sum(n for _, _, n in report.written)} patches, to {directory}"
          + (f"; {len(report.skipped)} already there" if report.skipped else ""))
    if report.failed:
        print(f"{len(report.failed)} source(s) could not be embedded:", file=sys.stderr)
        for path, reason in report.failed:
            print(f"  {path} ({reason})", file=sys.stderr)
