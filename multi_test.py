"""Evaluate every checkpoint in a folder, and any encoder, with the Kimia Path24 metrics.

    python3 multi_test.py model/ [--data-dir KIMIA_data] [--protocol test|train|both] [--results-mode overwrite|append]
    python3 multi_test.py --encoder histogram --data-dir KIMIA_data --output-dir results/
    python3 multi_test.py model/ --encoder uni --encoder-weights pytorch_model.bin --encoder histogram

Protocols (every output names the one that produced it):
- test (default, the reference's): leave-one-out retrieval inside the test set; each test patch
  is predicted by the class of its most similar other test patch.
- train (Kimia Path24's own): each test patch is searched against the training set.
--groups CSV (columns image,group; a group is a slide or a patient) names the protocols that respect
slides instead: test-groups, leave-one-out in the test set where no image of the query's group is a
neighbour (the query itself included), and train-groups when the file also gives the training images'
groups (a training image of the query's group is left out; a file without training images leaves the
train protocol as it is). `image` is the path under the data folder (test/ADI/x.png), under the
split folder (ADI/x.png), or the file name alone when no other image has it; every test image needs a
group. Leave-one-out without groups rewards finding the same slide whenever test patches share slides
(docs/reproduction.md: which protocol to report).

Each `.pth` file of the folder, sorted by name, is either a checkpoint written by train.py
(architecture, embedding size, crop size and class names read from it) or a bare state_dict
written by the reference code (architecture from the file-name prefix ABE_M_, se_resnet_,
se_resnet50_ or resnet50_, attention from its keys, crop 224). A file that cannot be evaluated is
reported with the reason and the sweep goes on; the exit status is 1 if any file failed or an
image could not be decoded (it is left out, and listed at the end).

Each run's result is the file its validation loss selected (histo_retrieval/evaluation/selection.py): per run identity (the
model and loss with their non-default options, read from the checkpoint, so that the ablation
se_resnet50-noattention_MSLoss is a run of its own beside se_resnet50_MSLoss), the best-validation
file with the lowest validation loss, i.e. the newest best; <identity>_checkpoint.pth (checkpoint.pth
from earlier versions) is the last epoch, not a selection. The console summary shows those first; the ranking of all files
by test score that follows selects on the test set and is no result to report.

--encoder SPEC (repeatable; docs/encoders.md) adds an encoder scored with no training on the same
protocols and metrics: timm:<architecture>, a pathology foundation model preset, the colour histogram,
or a checkpoint file. Each --encoder-weights FILE and --encoder-options JSON belongs to the --encoder
just before it. An encoder is no training run, so no selection applies: its rows have selected_by
`encoder` and the summary shows them in a table of their own. Without a folder, --output-dir is needed.

Outputs, beside the checkpoints unless --output-dir says otherwise:
- <model>_results.txt: one line per checkpoint and protocol in the reference's format,
  `<file>[(eta_p, 'np'), (eta_W, 'nw'), (eta_total, 'n_total')]`, followed by `# protocol=...`
  (test, train, test-groups or train-groups);
  for an encoder, <spec>_results.txt (`timm:resnet18` -> timm-resnet18_results.txt), its lines
  named <spec>_<weights file stem> (timm-resnet18_r18; histogram);
- results.csv: every metric, the validation loss, `selected_by` (validation, last_epoch, encoder or
  empty), the encoder (spec, kind, weights_sha256, input steps, normalisation: a checkpoint's own),
  the settings, the class list and the command, one row per checkpoint or encoder and protocol;
  with --groups also `exclusion` (group: the query's group left out; none: the training set whole),
  `groups` (the file), `groups_sha256` and `num_groups`;
- both rewritten with this sweep's rows only (--results-mode overwrite, the reference's), or
  with them added after earlier sweeps' (append);
- confusion/<checkpoint or encoder name>_<protocol>.csv and .png (protocol as in the results line): the confusion matrix (rows true
  class, columns predicted class);
- with --plot-embeddings, embeddings/<checkpoint or encoder name>_tsne.png: the test embeddings in
  2-D (t-SNE), coloured by class.
Images are decoded and centre-cropped once per run and input steps into a temporary file
(--cache-dir, deleted at the end) that every checkpoint reads batch by batch, so memory does not
grow with the data set.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from histo_retrieval.data.datasets import read_groups
from histo_retrieval.encoders.base import Encoder
from histo_retrieval.encoders.registry import (EncoderRequest, add_encoder_args, check_encoder_spec, encoder_requests,
                                               is_named_encoder, load_encoder)
from histo_retrieval.encoders.weights import CheckpointError
from histo_retrieval.encoders.project import load_model
from histo_retrieval.errors import UserError, one_line, run_script
from histo_retrieval.evaluation.protocols import (PROTOCOLS, RESULTS_MODES, Evaluator, ResultFiles, encoder_table,
                                                  plot_embeddings, protocol_label, ranking_table, result_name,
                                                  result_stem,
                                                  selected_table, tsne_coordinates, write_outputs)
from histo_retrieval.files import command_line
from histo_retrieval.images import report_unreadable
from histo_retrieval.runtime import add_runtime_args, check_runtime
from histo_retrieval.evaluation.selection import ENCODER, LAST_EPOCH, VALIDATION, describe_checkpoint, select


def print_summary(rows: Sequence[dict], unevaluated: Sequence[str]) -> None:
    """The validation-selected results first, then the encoders named by --encoder, then every row
    ranked by its test score.

    `unevaluated`: validation-selected files that failed, whose run therefore has no result.
    """
    checkpoints = any(r["selected_by"] != ENCODER for r in rows)
    encoders = any(r["selected_by"] == ENCODER for r in rows)
    if checkpoints or not rows:
        print("\nselected by validation (per run, the newest best-validation file: the result to report)")
        if any(r["selected_by"] == VALIDATION for r in rows):
            print(selected_table(rows))
        else:
            print("none: no best-validation file with a readable validation loss was evaluated")
    for name in unevaluated:
        print(f"{name}: selected by validation but could not be evaluated, so its run has no result")
    if encoders:
        print("\nencoders named by --encoder (no training run: no selection applies; each is a result as it is)")
        print(encoder_table(rows))
    what = "files and encoders" if checkpoints and encoders else "encoders" if encoders else "files"
    print(f"\nall {what}, best on the test set first (selection on the test set: not a result to report)")
    print(ranking_table(rows))


def draw_embedding_map(result: dict, output_dir: Path) -> None:
    """<output_dir>/embeddings/<name>_tsne.png: the test embeddings of one checkpoint or encoder, in 2-D."""
    path = output_dir / "embeddings" / f"{result_stem(result)}_tsne.png"
    title = (f"{result['checkpoint']}: t-SNE of the {len(result['query_labels'])} test embeddings "
             f"(eta_p {result['eta_p']:.4f} in the {protocol_label(result)} protocol)")
    try:
        coordinates = tsne_coordinates(result["query_embeddings"])
    except UserError as err:  # too few test images: the sweep's results stand without the figure
        print(f"no embedding map for {result['checkpoint']}: {err}", flush=True)
        return
    plot_embeddings(path, coordinates, result["query_labels"], result["class_names"], title)
    print(f"embedding map: {path}", flush=True)


# ----------------------------------------------------------------------------- script
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weight_folder", nargs="?", default=None,
                        help="folder whose .pth files are evaluated (default: none; then --encoder is needed)")
    parser.add_argument("--data-dir", default="KIMIA_data",
                        help="folder holding test/<class>/ and, for protocol train, train/<class>/ (default: KIMIA_data)")
    parser.add_argument("--protocol", choices=("test", "train", "both"), default="test",
                        help="test: leave-one-out in the test set (the reference's); train: test patches searched "
                             "against the training set (Kimia Path24's); both (default: test)")
    parser.add_argument("--groups", default=None, metavar="CSV",
                        help="CSV with columns image,group (group: the slide or patient of each image; image: its "
                             "path under the data folder or the split folder, or its file name): no image of the "
                             "query's group is ever its neighbour (protocols test-groups, train-groups); every test "
                             "image needs a group (default: none, the paper's protocols)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--crop-size", type=int, default=None,
                        help="centre crop for every checkpoint (default: each checkpoint's own; 224 for bare "
                             "reference state_dicts); the other encoders keep their own input steps")
    parser.add_argument("--output-dir", default=None,
                        help="where results go (default: the weight folder; needed when there is none)")
    parser.add_argument("--results-mode", choices=RESULTS_MODES, default="overwrite",
                        help="overwrite: <model>_results.txt and results.csv hold this sweep's rows only, as the "
                             "reference's; append: add them after earlier sweeps' (default: overwrite)")
    parser.add_argument("--plot-embeddings", action="store_true",
                        help="draw each checkpoint's test embeddings in 2-D (t-SNE), coloured by class, into "
                             "<output-dir>/embeddings/<checkpoint>_tsne.png (default: off)")
    parser.add_argument("--cache-dir", default=None,
                        help="folder of the temporary file holding the decoded crops, deleted at the end (default: "
                             "the system's temporary folder, $TMPDIR or /tmp)")
    add_encoder_args(parser, repeatable=True,
                     spec_help="an encoder to score with no training, beside the folder's checkpoints or alone: "
                               "timm:<architecture>, a preset, histogram, or a checkpoint file (docs/encoders.md; "
                               "default: none, the folder's checkpoints only).")
    add_runtime_args(parser, workers_note="they decode each image once per run")
    return parser


def checkpoint_crop(request: EncoderRequest, crop_size: int | None) -> int | None:
    """--crop-size for this --encoder: it applies to a checkpoint only; the others keep their own input steps."""
    return None if is_named_encoder(request.spec) else crop_size


def check_requests(requests: Sequence[EncoderRequest], crop_size: int | None) -> None:
    """Refuse a bad --encoder before any work (one line, exit status 2)."""
    for request in requests:
        check_encoder_spec(request.spec, request.weights, request.options, checkpoint_crop(request, crop_size))


def load_request(request: EncoderRequest, device: torch.device, crop_size: int | None) -> Encoder:
    """The encoder of one --encoder."""
    return load_encoder(request.spec, device, request.weights, request.options, checkpoint_crop(request, crop_size))


def main(args: argparse.Namespace) -> int:
    """Evaluate every .pth of args.weight_folder, then every --encoder; returns the exit status (1 if
    any file or encoder failed or an image was left out)."""
    requests = encoder_requests(args)
    files: list[Path] = []
    if args.weight_folder is None and not requests:
        raise UserError("pass the folder holding the .pth checkpoints, or --encoder SPEC (or both)")
    if args.weight_folder is not None:
        folder = Path(args.weight_folder)
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder; pass the folder holding the .pth checkpoints")
        files = sorted(p for p in folder.iterdir() if p.suffix == ".pth" and p.is_file())
        if not files:
            raise UserError(f"{folder}: no .pth files in it; pass the folder train.py wrote (default model/)")
    elif not args.output_dir:
        raise UserError("--output-dir: pass the folder the results go to (there is no weight folder to write beside)")
    if args.crop_size is not None and args.crop_size < 1:
        raise UserError(f"--crop-size must be positive, got {args.crop_size}")
    check_requests(requests, args.crop_size)
    device = check_runtime(args)
    output_dir = Path(args.output_dir) if args.output_dir else Path(args.weight_folder)
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    # Read before any work, so that a file missing an image stops the run at once.
    groups = (read_groups(args.groups, args.data_dir, ("test", "train") if "train" in protocols else ("test",))
              if args.groups else None)
    if groups:
        print(f"groups: {groups.path} ({len(groups.names)} groups, sha256 {groups.sha256[:12]}); protocols "
              f"{', '.join(p + '-groups' if p == 'test' or groups.covers(p) else p for p in protocols)}"
              + (f"; {groups.unmatched_rows} rows name no image of the splits read" if groups.unmatched_rows else ""),
              flush=True)
    result_files = ResultFiles(output_dir, args.results_mode)
    described = {path: describe_checkpoint(path) for path in files}
    selection = select(described.values())
    command = command_line()
    rows, failures, unevaluated = [], [], []
    with Evaluator(args.data_dir, args.batch_size, args.amp, device, args.workers, args.channels_last,
                   args.cache_dir, groups) as evaluator:
        for path in files:
            try:
                loaded = load_model(path, evaluator.device, args.crop_size)
                results = evaluator.evaluate(loaded, protocols)
            except (CheckpointError, RuntimeError) as err:  # RuntimeError: e.g. a crop too small, out of memory
                failures.append(str(err) if isinstance(err, CheckpointError)
                                else f"{path.name}: evaluation failed ({one_line(err)})")
                print(f"FAILED {failures[-1]}", flush=True)
                if selection[path] == VALIDATION:
                    unevaluated.append(path.name)
                continue
            tag = {VALIDATION: ", selected by validation", LAST_EPOCH: ", last epoch"}.get(selection[path], "")
            for result in results:
                result.update(selected_by=selection[path], val_loss=described[path].val_loss, run=described[path].run)
                rows.append(write_outputs(result, result_files, command))
                warning = "" if result["checkpoint_classes_match"] else "  (its class list differs from the data's)"
                print(f"{path.name} [{loaded.model_name}, protocol {protocol_label(result)}{tag}]: eta_p "
                      f"{result['eta_p']:.4f} eta_W {result['eta_w']:.4f} eta_total {result['eta_total']:.4f} "
                      f"({result['correct']}/{result['num_queries']}) in {result['seconds']:.1f} s{warning}", flush=True)
            if args.plot_embeddings:
                draw_embedding_map(results[0], output_dir)
            del loaded, results
        names = {path.name for path in files}
        for request in requests:
            try:  # UserError: e.g. a weights file that does not fit, options timm refuses
                loaded = load_request(request, evaluator.device, args.crop_size)
            except (UserError, RuntimeError) as err:
                failures.append(f"--encoder {request.spec}: {one_line(err)}")
                print(f"FAILED {failures[-1]}", flush=True)
                continue
            name = unique_name(result_name(loaded), loaded, names)
            print(f"{name}: {loaded.describe()}", flush=True)
            try:
                results = evaluator.evaluate(loaded, protocols, name)
            except RuntimeError as err:  # e.g. out of memory; bad data stops the sweep as for the checkpoints
                failures.append(f"--encoder {request.spec}: evaluation failed ({one_line(err)})")
                print(f"FAILED {failures[-1]}", flush=True)
                del loaded
                continue
            described_file = describe_checkpoint(loaded.path) if loaded.kind == "checkpoint" else None
            for result in results:
                result.update(selected_by=ENCODER, val_loss=described_file.val_loss if described_file else None,
                              run=described_file.run if described_file else "")
                rows.append(write_outputs(result, result_files, command))
                warning = "" if result["checkpoint_classes_match"] else "  (its class list differs from the data's)"
                print(f"{name} [{request.spec}: {loaded.model_name}, protocol {protocol_label(result)}, encoder, weights "
                      f"{result['weights_sha256'][:12]}]: eta_p {result['eta_p']:.4f} eta_W {result['eta_w']:.4f} "
                      f"eta_total {result['eta_total']:.4f} ({result['correct']}/{result['num_queries']}) in "
                      f"{result['seconds']:.1f} s{warning}", flush=True)
            if args.plot_embeddings:
                draw_embedding_map(results[0], output_dir)
            del loaded, results
        failed_images = evaluator.failed_images
    if rows:
        print_summary(rows, unevaluated)
        print(f"\nresults: {output_dir / 'results.csv'}, {output_dir}/<model>_results.txt, {output_dir / 'confusion'}/")
    report_unreadable(failed_images)
    if failures:
        what = "files" if not requests else "files and encoders" if files else "encoders"
        print(f"\n{len(failures)} of {len(files) + len(requests)} {what} failed:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
    return 1 if failures or failed_images else 0


def unique_name(name: str, encoder: Encoder, taken: set[str]) -> str:
    """`name`, or when an earlier encoder of the sweep has it, `name` with the start of the weights hash
    (then a count): each encoder's confusion and map files stay its own."""
    candidates = [name, f"{name}_{encoder.weights_sha256()[:8]}"]
    candidates += [f"{candidates[1]}_{count}" for count in range(2, len(taken) + 3)]
    chosen = next(c for c in candidates if c not in taken)
    taken.add(chosen)
    return chosen


if __name__ == "__main__":
    sys.exit(run_script(main, get_args_parser().parse_args()))
