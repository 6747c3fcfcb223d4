"""Search a collection of patches for the ones most similar to a query, with a trained model.

    python3 retrieve.py index CHECKPOINT IMAGE_DIR --out index.pt
    python3 retrieve.py query index.pt IMAGE_OR_FOLDER... --top-k 5 --out-dir retrieval/ [--faiss]

`index` embeds every image under IMAGE_DIR (an image in a subfolder takes that top-level folder's
name as its class, as in KIMIA_data/train/<class>/; images directly in IMAGE_DIR have none) and
saves embeddings, paths and classes in one reusable file. `query` embeds the query images with the
same checkpoint, prints the top-k matches with their similarity (the mean over the model's learners
of the cosine similarities) and class, and writes one PNG grid per query (the query, then its
matches, each labelled; green or red frames when the query's class is known, from its folder or
its `<class>_` file-name prefix) and matches.csv. A query that is itself in the index is not
returned as its own match.

The search is exact: torch ranks in blocks by default; --faiss (needs `pip install faiss-cpu`)
uses a faiss inner-product index instead, which is faster on large collections. Images are decoded
and embedded batch by batch (core.embedder), so memory does not grow with the collection; one that
cannot be decoded is left out (the index lists it under `failed`) and reported at the end, and the
exit status is then 1.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from core.checkpoint import load_model, read_torch_file, save_torch_file
from core.embedder import Embedder, check_settings
from core.errors import UserError, run_script
from core.files import atomic_write_text, command_line, list_images
from core.images import load_rgb, report_unreadable
from core.runtime import add_runtime_args, check_runtime, select_device
from metrics import topk_similar
from utils import pyplot, save_figure

INDEX_FORMAT = 1
INDEX_KEYS = ("format", "embeddings", "paths", "classes", "checkpoint", "model_name", "model_options", "crop_size")


def build_index(checkpoint: str | os.PathLike, image_dir: str | os.PathLike, batch_size: int = 32, amp: str = "off",
                device: torch.device | str | None = None, crop_size: int | None = None, workers: int = 0,
                channels_last: bool = False) -> dict:
    """The index of every image under `image_dir`, as saved by `retrieve.py index`; unreadable
    images are left out and listed under "failed"."""
    if not Path(image_dir).is_dir():
        raise UserError(f"{image_dir}: no such folder; pass the folder of images to index")
    found = list_images(image_dir)
    if not found:
        raise UserError(f"{image_dir}: no image files (jpg, png, tif, bmp) in it or its subfolders")
    paths, classes = [path for path, _ in found], [name for _, name in found]
    device = select_device(device)
    loaded = load_model(checkpoint, device, crop_size)
    embedder = Embedder(loaded.model, device, batch_size, amp, channels_last)
    embeddings, kept, failed = embedder.embed_files(paths, loaded.crop_size, workers)
    return {
        "format": INDEX_FORMAT, "embeddings": embeddings, "paths": [os.path.abspath(paths[i]) for i in kept],
        "classes": [classes[i] for i in kept], "checkpoint": os.path.abspath(checkpoint),
        "model_name": loaded.model_name, "model_options": loaded.model_options, "crop_size": loaded.crop_size,
        "image_dir": os.path.abspath(image_dir), "failed": [list(f) for f in failed], "command": command_line(),
    }


def load_index(path: str | os.PathLike) -> dict:
    if not Path(path).is_file():
        raise UserError(f"{path}: no such index file; build one with `python3 retrieve.py index`")
    index = read_torch_file(path)
    if not isinstance(index, dict) or any(key not in index for key in INDEX_KEYS):
        raise UserError(f"{path}: not an index written by `python3 retrieve.py index`")
    return index


def search(queries: torch.Tensor, gallery: torch.Tensor, k: int, exclude: torch.Tensor,
           use_faiss: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product (scores, indices), never returning exclude[i] (-1: none) for query i."""
    if not use_faiss:
        return topk_similar(queries, gallery, k, exclude if (exclude >= 0).any() else None)
    try:
        import faiss  # optional: only --faiss needs it
    except ImportError:
        raise UserError("--faiss needs the faiss-cpu package: pip install faiss-cpu (or leave --faiss out)") from None
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery.float().contiguous().numpy())
    extra = int((exclude >= 0).any())
    scores, indices = index.search(queries.float().contiguous().numpy(), k + extra)
    scores, indices = torch.from_numpy(scores), torch.from_numpy(indices).long()
    keep = indices != exclude[:, None]
    # Rows that did not contain their excluded item drop their last (k+1-th) match instead.
    keep &= keep.long().cumsum(dim=1) <= k
    return scores[keep].view(-1, k), indices[keep].view(-1, k)


def query_class(path: str, known: set[str]) -> str | None:
    """The class of a query image: its folder's name or its `<class>_` file-name prefix, if the index knows it."""
    folder, prefix = Path(path).parent.name, Path(path).name.split("_", 1)[0]
    return folder if folder in known else prefix if prefix in known else None


def draw_grid(path: str | os.PathLike, query_path: str, query_label: str | None, matches: Sequence[dict]) -> None:
    """Query then matches in one row, each labelled; frames green/red when the query's class is known."""
    fig, axes = pyplot().subplots(1, len(matches) + 1, figsize=(2.2 * (len(matches) + 1), 2.7), squeeze=False)
    panels = [(query_path, f"query\n{query_label or 'class unknown'}", "black")]
    for match in matches:
        colour = "black" if query_label is None else "green" if match["class"] == query_label else "red"
        panels.append((match["path"], f"#{match['rank']}  {match['similarity']:.3f}\n{match['class'] or '?'}", colour))
    for ax, (image_path, title, colour) in zip(axes[0], panels):
        ax.imshow(load_rgb(image_path))
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(4 if colour != "black" else 1)
    fig.tight_layout()
    save_figure(fig, path)


def run_query(index: dict, query_paths: Sequence[str], top_k: int = 5, out_dir: str | os.PathLike | None = "retrieval",
              use_faiss: bool = False, checkpoint: str | None = None, batch_size: int = 32, amp: str = "off",
              device: torch.device | str | None = None, workers: int = 0,
              channels_last: bool = False) -> tuple[list[dict], list[tuple[str, str]]]:
    """Top-k matches of each readable query image (one dict per query), and (path, reason) of the
    unreadable ones; grids and matches.csv go to `out_dir`."""
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    device = select_device(device)
    checkpoint = checkpoint or index["checkpoint"]
    if not Path(checkpoint).is_file():
        raise UserError(f"{checkpoint}: the index's checkpoint is missing; pass its new place with --checkpoint")
    loaded = load_model(checkpoint, device, index["crop_size"])
    if loaded.model_name != index["model_name"] or loaded.model_options != index["model_options"]:
        raise UserError(f"{checkpoint}: a {loaded.model_name} {loaded.model_options}, but the index was built with "
                        f"a {index['model_name']} {index['model_options']}; pass the index's checkpoint")
    embedder = Embedder(loaded.model, device, batch_size, amp, channels_last)
    embeddings, kept, failed = embedder.embed_files(query_paths, index["crop_size"], workers)
    query_paths = [query_paths[i] for i in kept]
    position = {path: i for i, path in enumerate(index["paths"])}
    exclude = torch.tensor([position.get(os.path.abspath(p), -1) for p in query_paths])
    k = min(top_k, len(index["paths"]) - int((exclude >= 0).any()))
    if k < 1:
        raise UserError("the index holds no image besides the query; index a larger folder")
    if k < top_k:
        print(f"note: the index holds only {k} other images; showing {k} matches per query")
    scores, indices = search(embeddings, index["embeddings"], k, exclude, use_faiss)
    known = {c for c in index["classes"] if c is not None}
    results = []
    for query_number, query_path in enumerate(query_paths):
        label = query_class(query_path, known)
        matches = [{"rank": rank + 1, "similarity": float(score), "path": index["paths"][i], "class": index["classes"][i]}
                   for rank, (score, i) in enumerate(zip(scores[query_number].tolist(), indices[query_number].tolist()))]
        print(f"\nquery {query_path} (class {label or 'unknown'})")
        for match in matches:
            verdict = "" if label is None else "  right" if match["class"] == label else "  wrong"
            print(f"  {match['rank']:>3}  {match['similarity']:.4f}  {match['class'] or '?':<10} {match['path']}{verdict}")
        grid = None
        if out_dir is not None:
            grid = Path(out_dir) / f"{query_number:03d}_{Path(query_path).stem}.png"
            draw_grid(grid, query_path, label, matches)
        results.append({"query": query_path, "class": label, "matches": matches, "grid": str(grid) if grid else None})
    if out_dir is not None:
        write_matches_csv(Path(out_dir) / "matches.csv", results, command_line())
        print(f"\ngrids and matches.csv written to {out_dir}")
    return results, failed


def write_matches_csv(path: Path, results: Sequence[dict], command: str) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["query", "query_class", "rank", "similarity", "match", "match_class", "grid", "command"])
    for result in results:
        for match in result["matches"]:
            writer.writerow([result["query"], result["class"] or "", match["rank"], f"{match['similarity']:.6f}",
                             match["path"], match["class"] or "", result["grid"], command])
    atomic_write_text(path, buffer.getvalue())


def collect_queries(items: Sequence[str]) -> list[str]:
    paths = []
    for item in items:
        if Path(item).is_dir():
            found = [path for path, _ in list_images(item)]
            if not found:
                raise UserError(f"{item}: no image files in this folder")
            paths += found
        elif Path(item).is_file():
            paths.append(item)
        else:
            raise UserError(f"{item}: no such image or folder")
    return paths


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    add_runtime_args(common)

    index = commands.add_parser("index", parents=[common], help="embed a folder of images into an index file")
    index.add_argument("checkpoint", help="checkpoint written by train.py, or a bare reference state_dict")
    index.add_argument("image_dir", help="folder of images (class subfolders optional)")
    index.add_argument("--out", default="index.pt", help="index file to write (default: index.pt)")
    index.add_argument("--crop-size", type=int, default=None,
                       help="centre crop (default: the checkpoint's; 224 for a bare reference state_dict)")

    query = commands.add_parser("query", parents=[common], help="find the images of an index most similar to queries")
    query.add_argument("index", help="index file written by `retrieve.py index`")
    query.add_argument("images", nargs="+", help="query images or folders of them")
    query.add_argument("--top-k", type=int, default=5, help="matches per query (default: 5)")
    query.add_argument("--out-dir", default="retrieval",
                       help="folder for the grid PNGs and matches.csv (default: retrieval)")
    query.add_argument("--faiss", action="store_true",
                       help="search with a faiss inner-product index (needs faiss-cpu; default: off, exact torch "
                            "search)")
    query.add_argument("--checkpoint", default=None,
                       help="the index's checkpoint, if it moved (default: the path saved in the index)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Build an index or answer queries; returns the exit status (1 if an image was left out)."""
    check_settings(args.batch_size, args.amp)
    device = check_runtime(args)
    if args.command == "index":
        index = build_index(args.checkpoint, args.image_dir, args.batch_size, args.amp, device, args.crop_size,
                            args.workers, args.channels_last)
        save_torch_file(index, args.out)
        known = sorted({c for c in index["classes"] if c is not None})
        print(f"indexed {len(index['paths'])} images ({len(known)} classes) with {index['model_name']} into {args.out}")
        failed = [tuple(failure) for failure in index["failed"]]
    else:
        _, failed = run_query(load_index(args.index), collect_queries(args.images), args.top_k, args.out_dir,
                              args.faiss, args.checkpoint, args.batch_size, args.amp, device, args.workers,
                              args.channels_last)
    report_unreadable(failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_script(main, get_args_parser().parse_args()))
