"""Search an archive of whole slides and patches for the tissue most similar to a query.

    python3 retrieve.py index CHECKPOINT SOURCE... --index DIR [--mpp 0.5] [--patch-size N]
    python3 retrieve.py index --encoder SPEC [--encoder-weights FILE] SOURCE... --index DIR
    python3 retrieve.py embed --encoder SPEC SOURCE... --out-dir DIR      # CLAM/TRIDENT .h5 features
    python3 retrieve.py query --index DIR QUERY... [--top-k 10] [--region X,Y,W,H] [--heatmap]
    python3 retrieve.py list --index DIR
    python3 retrieve.py label --index DIR LABELS.csv                     # columns slide,label,patient
    python3 retrieve.py evaluate --index DIR [--out-dir DIR] [--exclude patient|slide] [--slide-score votes]
    python3 retrieve.py remove --index DIR SOURCE...
    python3 retrieve.py compact --index DIR                              # give back removed vectors' space
    python3 retrieve.py reindex --index DIR --index-type flat|ivf|hnsw|ivfpq   # from the stored vectors
    python3 retrieve.py upgrade --index DIR                              # an index folder of format 1
    python3 retrieve.py serve --index DIR [--host 127.0.0.1] [--port 8000] [--allowed-hosts HOST[,HOST]]

`index` creates the index folder DIR or adds to it, with the vectors of a checkpoint of this project
or of any encoder --encoder names (timm:<architecture>, a pathology foundation model preset, the
colour histogram: docs/encoders.md); the manifest records it and its weights' hash. A SOURCE is a
whole-slide file (read through OpenSlide: Aperio SVS, tiled TIFF, NDPI, MRXS...; tiffslide for TIFFs
OpenSlide cannot read; a plain image is a slide of one level), cut where there is tissue into
--patch-size patches at --mpp microns per pixel; or a folder of patch images (an image in a
subfolder takes that first-level folder's name as its class, as in KIMIA_data/train/<class>/).
Sources already indexed are skipped (--replace indexes them again); each source is committed as soon
as it is embedded, so a stopped run keeps what it finished, and running it again finishes the rest.
Under torchrun, each process indexes its share of the sources. A slide that cannot be read, or a
SOURCE that is not there, is named, skipped and reported at the end, and the exit status is then 1;
when no SOURCE is there, nothing is created or changed and the exit status is 2.

`query` embeds each QUERY with the index's encoder: an image file (a patch at the index's scale),
a folder of them, a region of a slide (--region, level-0 pixels), or a whole slide (each of its
tissue patches). It writes matches.csv (each query patch's top-k matches), slides.csv (the indexed
slides ranked by the votes of the query patches' first matches, then by mean similarity),
query.json (the command and the index's manifest) and one PNG per query to --out-dir. Similarity
is the mean over the model's learners of the cosine similarities. An index with no patches is
refused (exit status 2, nothing written). See docs/slide_search.md.

`embed` writes the patch features of each SOURCE, cut as `index` cuts them, to DIR/<slide stem>.h5
(`features`, `coords`) or DIR/<folder name>.h5 (`features`, `files`, `classes`): the layout CLAM and
TRIDENT write, for multiple-instance-learning tools (docs/slide_search.md).

`serve` opens the search page (docs/search_page.md) on http://localhost:8000/: the index's slides
in a zoomable viewer, search by an uploaded patch or a drawn region, matches shown on the slides.
It reads the index and never changes it, and listens on this machine only unless --host says otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from histo_retrieval import distributed
from histo_retrieval.encoders.base import Encoder
from histo_retrieval.encoders.registry import add_encoder_args, encoder_from_args, is_named_encoder
from histo_retrieval.evaluation.embedder import Embedder, check_settings
from histo_retrieval.errors import UserError
from histo_retrieval.images import report_unreadable
from histo_retrieval.runtime import add_runtime_args, check_runtime
from histo_retrieval.search.index import FORMAT, IndexSettings, SlideIndex, upgrade_index
from histo_retrieval.search.labels import read_labels
from histo_retrieval.search.slide_evaluation import EXCLUSIONS, SLIDE_SCORES, rank_labelled_slides, write_evaluation
from histo_retrieval.search.mosaic import add_mosaic_args, mosaic_from_args
from histo_retrieval.search.indexing import build_index, check_sources
from histo_retrieval.search.queries import load_index_encoder, query_jobs, run_queries
from histo_retrieval.search.slides import Tiling
from histo_retrieval.search.vector_store import DTYPES
from histo_retrieval.search.vector_index import (DEFAULT_EF_SEARCH, DEFAULT_MIN_NPROBE, DEFAULT_NPROBE_FRACTION,
                                                    DEFAULT_PQ_BYTES, INDEX_TYPES)


def parse_region(text: str) -> tuple[int, int, int, int]:
    try:
        x, y, width, height = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected X,Y,WIDTH,HEIGHT in level-0 pixels, "
                                         "e.g. 1024,2048,448,448") from None
    return x, y, width, height


def parse_hosts(text: str) -> list[str]:
    hosts = [part.strip() for part in text.split(",") if part.strip()]
    for host in hosts:
        if not re.fullmatch(r"[A-Za-z0-9.-]+|\[?[0-9A-Fa-f:.]+\]?", host) or host.count(":") == 1:
            raise argparse.ArgumentTypeError(f"{host!r}: expected host names or addresses without a scheme or "
                                             "port, comma-separated, e.g. search.example.org,10.0.0.5")
    return hosts


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--batch-size", type=int, default=32, help="patches per forward pass (default: 32)")
    model.add_argument("--slide-mpp", type=positive_float, default=None,
                       help="microns per pixel of slides whose files give no scale (default: none; such a slide "
                            "is refused)")
    add_runtime_args(model, workers_note="each reads patches of slides through its own handle")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--index", default=None, metavar="DIR",
                       help="the index folder; every sub-command needs one (no default)")

    tiling = argparse.ArgumentParser(add_help=False)  # how index and embed cut slides into patches
    tiling.add_argument("--mpp", type=positive_float, default=0.5,
                        help="microns per pixel of the slide patches, about 20x (default: %(default)s)")
    tiling.add_argument("--patch-size", type=int, default=None,
                        help="slide patch side in pixels at --mpp (default: the encoder's input size)")
    tiling.add_argument("--tissue-threshold", type=float, default=0.5,
                        help="tissue fraction a slide patch needs to be kept (default: %(default)s)")
    mosaic = argparse.ArgumentParser(add_help=False)  # index and query: each slide's mosaic only
    add_mosaic_args(mosaic)

    index = commands.add_parser("index", parents=[model, where, tiling, mosaic], help="create an index or add sources to it")
    index.add_argument("sources", nargs="+", metavar="SOURCE",
                       help="whole-slide files, plain images, or folders of patches; without --encoder, the first "
                            "is the checkpoint (written by train.py, or a bare reference state_dict)")
    add_encoder_args(index, spec_help="the encoder instead of a CHECKPOINT: timm:<architecture>, a preset, histogram "
                                      "or a checkpoint's path (docs/encoders.md; default: none, the first positional "
                                      "argument is the checkpoint)")
    add_vector_index_args(index, new=True)
    index.add_argument("--vector-dtype", choices=DTYPES, default="float32",
                       help="how the index stores its vectors: float32 as computed, float16 in half the space "
                            "(default: %(default)s; fixed when the index is created)")
    index.add_argument("--vector-store", default=None, metavar="WHERE",
                       help="where the vectors live: local (the index folder, searched with faiss), "
                            "milvus-lite:PATH.db (Milvus Lite, embedded) or milvus://HOST:PORT[/COLLECTION] (a Milvus "
                            "server; collection default: patches); docs/slide_search.md (default: local; fixed when "
                            "the index is created)")
    index.add_argument("--crop-size", type=int, default=None,
                       help="model input size (default: the checkpoint's; 224 for a bare reference state_dict)")
    index.add_argument("--replace", action="store_true", help="index sources again that are already indexed "
                                                              "(default: skip them)")
    index.add_argument("--out", default=None, help=argparse.SUPPRESS)  # the old single-file index

    searching = argparse.ArgumentParser(add_help=False)
    searching.add_argument("--top-k", type=int, default=10, help="matches per query patch (default: %(default)s)")
    searching.add_argument("--checkpoint", default=None,
                           help="the index's checkpoint, if it moved (default: the path in manifest.json)")
    searching.add_argument("--encoder-weights", default=None, metavar="FILE",
                           help="the weights file of a timm or preset index's encoder, if it moved (default: the "
                                "path in manifest.json)")
    searching.add_argument("--nprobe", type=int, default=None,
                           help=f"IVF lists searched (default: 1/{round(1 / DEFAULT_NPROBE_FRACTION)} of the lists, at "
                                f"least {DEFAULT_MIN_NPROBE})")
    searching.add_argument("--ef-search", type=int, default=None,
                           help=f"HNSW search breadth (default: {DEFAULT_EF_SEARCH})")

    query = commands.add_parser("query", parents=[model, where, searching, mosaic], help="search the index with patches, regions or slides")
    query.add_argument("queries", nargs="+", help="image files, folders of them, or slide files")
    query.add_argument("--region", type=parse_region, default=None,
                       help="X,Y,WIDTH,HEIGHT: search with this level-0 region of each slide given (default: "
                            "whole slides)")
    query.add_argument("--out-dir", default="retrieval",
                       help="folder for matches.csv, slides.csv, query.json and the PNGs (default: %(default)s)")
    query.add_argument("--heatmap", action="store_true",
                       help="colour each patch of the matched slides' thumbnails by its similarity to the query "
                            "(default: off)")

    serve = commands.add_parser("serve", parents=[model, where, searching], help="open the search page on this machine")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: %(default)s, this machine only; put a reverse proxy "
                            "with authentication in front before sharing the page on a network)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    serve.add_argument("--allowed-hosts", type=parse_hosts, default=[], metavar="HOST[,HOST]",
                       help="more host names the page answers to, such as the public name a reverse proxy "
                            "forwards (default: none; 127.0.0.1, localhost, [::1] and --host always); any other "
                            "Host header is refused")

    listing = commands.add_parser("list", parents=[where], help="show an index's encoder, scale and sources")
    listing.add_argument("--failed", action="store_true", help="also list sources that failed (default: off)")
    listing.add_argument("--summary", action="store_true",
                         help="print the counts alone (sources, slides, folders, patches, failed, labelled), "
                              "counted without reading a row per source (default: off: every source listed)")
    label = commands.add_parser("label", parents=[where],
                                help="attach a label (diagnosis) and a patient to indexed slides, from a CSV file")
    label.add_argument("labels", metavar="LABELS.csv",
                       help="columns slide,label,patient: the slide's file name as indexed (or its full path), its "
                            "label, its patient (optional: empty means the slide is its own patient)")
    evaluate = commands.add_parser("evaluate", parents=[where],
                                   help="score slide search: each labelled slide queries the others (docs/slide_search.md)")
    evaluate.add_argument("--out-dir", default="slide_evaluation",
                          help="folder for slide_rankings.csv, slide_retrieval.csv, the per-class table, the "
                               "confusion matrix and evaluation.json (default: %(default)s)")
    evaluate.add_argument("--exclude", nargs="+", choices=EXCLUSIONS, default=["patient"],
                          help="left out of each query's ranking besides its own slide: every slide of its patient "
                               "(patient), or nothing more (slide); both give a row each (default: patient)")
    evaluate.add_argument("--top-k", type=int, default=5,
                          help="ranked slides written per query, at least 5 (default: %(default)s)")
    evaluate.add_argument("--slide-score", choices=SLIDE_SCORES, default="votes",
                          help="votes: the query patches' first matches vote, as `query` ranks slides; "
                               "median-of-best: Yottixel's median over the query's patches of each one's best "
                               "similarity to the slide (default: %(default)s)")
    evaluate.add_argument("--neighbours", type=int, default=10,
                          help="matches per query patch for the votes (default: %(default)s)")
    add_mosaic_args(evaluate)
    remove = commands.add_parser("remove", parents=[where], help="delete sources and their patches from an index")
    remove.add_argument("sources", nargs="+", help="sources as given to `index` (paths)")
    commands.add_parser("compact", parents=[where],
                        help="give back the space of removed sources' vectors (rewrites the vector store)")
    commands.add_parser("upgrade", parents=[where],
                        help="convert an index folder of format 1 (vectors inside patches.sqlite); embeds nothing")
    reindex = commands.add_parser("reindex", parents=[where],
                                  help="rebuild the faiss index as another type from the stored vectors")
    add_vector_index_args(reindex, new=False)

    embed = commands.add_parser("embed", parents=[model, tiling],
                                help="write each source's patch features to DIR/<name>.h5 (CLAM/TRIDENT layout)")
    add_encoder_args(embed, required=True)
    embed.add_argument("sources", nargs="+", help="whole-slide files, plain images, or folders of patches")
    embed.add_argument("--out-dir", required=True, metavar="DIR",
                       help="folder for the .h5 files and embed.json (created when missing; no default)")
    embed.add_argument("--replace", action="store_true",
                       help="write the files of sources again that DIR already holds (default: skip them)")
    return parser


def require_index(args: argparse.Namespace) -> str:
    if args.index:
        return args.index
    old = [item for item in getattr(args, "queries", []) if item.endswith(".pt") and Path(item).is_file()]
    if old:
        raise UserError(f"{old[0]}: an index file of the old format (one .pt file); rebuild it as an index folder: "
                        "python3 retrieve.py index CHECKPOINT IMAGE_DIR --index DIR")
    raise UserError("pass the index folder with --index DIR")


def encoder_and_sources(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(the encoder spec, the sources) of `index`: --encoder's, or the first positional argument, a
    checkpoint, as before encoders had names."""
    if args.encoder is not None:
        first = args.sources[0]
        if first.endswith((".pth", ".pt")) and Path(first).is_file() and len(args.sources) > 1:
            raise UserError(f"{first}: a checkpoint given beside --encoder {args.encoder}; with --encoder every "
                            "positional argument is a source: drop one of the two")
        return args.encoder, list(args.sources)
    if len(args.sources) < 2:
        raise UserError("pass the checkpoint and at least one SOURCE (retrieve.py index CHECKPOINT SOURCE... --index "
                        "DIR), or the encoder with --encoder SPEC")
    if is_named_encoder(args.sources[0]):
        raise UserError(f"{args.sources[0]}: an encoder, not a checkpoint file; pass it as --encoder {args.sources[0]}")
    return args.sources[0], list(args.sources[1:])


def run_index(args: argparse.Namespace, device: torch.device) -> int:
    if args.out is not None:
        raise UserError(f"--out {args.out}: indexes are now folders; pass --index DIR instead "
                        "(python3 retrieve.py index CHECKPOINT SOURCE... --index DIR)")
    directory = Path(require_index(args))
    spec, sources = encoder_and_sources(args)
    mosaic = mosaic_from_args(args)
    check_sources(sources)  # before the encoder is loaded: a typo is refused at once
    device, rank, world_size = distributed.setup_distributed(device)
    encoder = encoder_from_args(args, device, spec=spec)
    tiling = Tiling(args.mpp, args.patch_size or encoder.crop_size, args.tissue_threshold)
    choice = vector_index_choice(args)
    settings = IndexSettings.for_model(encoder, tiling, choice.pop("index_type"), choice.pop("ivf_lists"), mosaic,
                                       args.vector_dtype, **choice, vector_store=args.vector_store)
    if rank == 0:
        print_scale_note(encoder, args.mpp)
    embedder = Embedder(encoder.model, device, args.batch_size, args.amp, args.channels_last, encoder.preprocessing)
    report = build_index(directory, sources, settings, embedder, args.workers, args.slide_mpp, args.replace,
                         rank=rank, world_size=world_size)
    status = 1 if report.failed or report.unreadable_files else 0
    if rank != 0:
        return status
    print(f"indexed {len(report.indexed)} source(s), {sum(n for _, n in report.indexed)} patches; {directory} holds "
          f"{report.held_sources} source(s), {report.held_patches} patches")
    if report.failed:
        print(f"{len(report.failed)} source(s) could not be indexed:", file=sys.stderr)
        for path, reason in report.failed:
            print(f"  {path} ({reason})", file=sys.stderr)
    report_unreadable(report.unreadable_files)
    if note := encoder.preprocessing.passed_through_note():
        print(note)
    return status


def print_scale_note(encoder: Encoder, mpp: float) -> None:
    """A note when the encoder states another scale than the one its patches are cut at (not refused:
    the user may know better, e.g. a model trained at several magnifications)."""
    if encoder.mpp and encoder.mpp != mpp:
        print(f"note: {encoder.spec} expects patches at {encoder.mpp} um/px; they are cut at --mpp {mpp}")


def check_not_empty(index: SlideIndex) -> None:
    """Refuse to search an index with no patches (every source failed, or none was added): there is
    nothing to match, and empty result files would read as "no similar tissue"."""
    if index.patch_count():
        return
    failed = len(index.sources("failed"))
    why = f" ({failed} source(s) failed: `python3 retrieve.py list --index {index.directory} --failed` says why)" \
        if failed else ""
    raise UserError(f"{index.directory}: the index is empty, no patches to search{why}; add sources with "
                    f"`python3 retrieve.py index CHECKPOINT SOURCE... --index {index.directory}`")


def run_query(args: argparse.Namespace, device: torch.device) -> int:
    check_settings(args.batch_size, args.amp)
    mosaic = mosaic_from_args(args)
    if mosaic is not None and args.region is not None:
        raise UserError("--mosaic chooses patches of whole slides; a --region query is tiled whole, drop one of the two")
    with SlideIndex.open(require_index(args)) as index:
        check_not_empty(index)
        loaded = load_index_encoder(index, device, args.checkpoint, args.encoder_weights)
        embedder = Embedder(loaded.model, device, args.batch_size, args.amp, args.channels_last, loaded.preprocessing)
        jobs = query_jobs(args.queries, args.region, args.slide_mpp, mosaic)
        results, failed = run_queries(index, jobs, embedder, args.top_k, args.out_dir, args.heatmap, args.workers,
                                      args.slide_mpp, args.nprobe, args.ef_search)
    for result in results:
        print(f"\nquery {result.name} ({result.kind}, {len(result.boxes)} patch(es))")
        for match in result.matches[0][:args.top_k] if len(result.matches) == 1 else []:
            p = match.patch
            print(f"  {match.rank:>3}  {match.similarity:.4f}  {p.class_name or '':<10} {p.file or p.source}"
                  + ("" if p.file else f" @ {p.x},{p.y}"))
        for slide in result.slides[:5]:
            print(f"  slide #{slide.rank}: {slide.source}  votes {slide.votes}  score {slide.score:.4f}")
    if args.out_dir and results:
        print(f"\nmatches.csv, slides.csv and figures written to {args.out_dir}")
    report_unreadable(failed)
    if note := loaded.preprocessing.passed_through_note():
        print(note)
    return 1 if failed else 0


def run_list(args: argparse.Namespace) -> int:
    with SlideIndex.open(require_index(args)) as index:
        if args.summary:
            for name, count in index.source_counts().items():
                print(f"{name}: {count}")
            return 0
        s = index.settings
        print(f"index {index.directory}: {s.describe_encoder()}, {index.describe_vector_index()}")
        print(f"patches of {s.patch_size} px at {s.mpp} um/px, tissue threshold {s.tissue_threshold}"
              + (f"; each slide's mosaic only ({s.mosaic.describe()})" if s.mosaic else ""))
        print(describe_store(index))
        rows = index.sources(None if args.failed else "indexed")
        print(f"{sum(r.patch_count for r in rows)} patches in {sum(r.state == 'indexed' for r in rows)} source(s)")
        for row in rows:
            detail = f"{row.patch_count:>8} patches  {row.kind:<6}" if row.state == "indexed" else \
                f"  failed: {row.reason}"
            labelled = f"  label {row.label}" + (f", patient {row.patient}" if row.patient else "") if row.label else ""
            print(f"  {detail}  {row.path}{labelled}")
    return 0


def run_embed(args: argparse.Namespace, device: torch.device) -> int:
    from histo_retrieval.search.features import export_features, plan_export, print_report

    plan = plan_export(args.sources, args.out_dir)  # before the encoder is loaded: a typo is refused at once
    encoder = encoder_from_args(args, device)
    tiling = Tiling(args.mpp, args.patch_size or encoder.crop_size, args.tissue_threshold)
    print(f"encoder {encoder.describe()}")
    print_scale_note(encoder, args.mpp)
    embedder = Embedder(encoder.model, device, args.batch_size, args.amp, args.channels_last, encoder.preprocessing)
    report = export_features(plan, encoder, embedder, tiling, args.workers, args.slide_mpp, args.replace)
    print_report(report, plan.directory)
    report_unreadable(report.unreadable_files)
    if not report.written and not report.skipped:
        raise UserError(f"none of the {len(plan.jobs) + len(plan.missing)} source(s) could be embedded (reasons "
                        f"above); nothing written to {plan.directory}")
    if note := encoder.preprocessing.passed_through_note():
        print(note)
    return 1 if report.failed or report.unreadable_files else 0


def run_label(args: argparse.Namespace) -> int:
    with SlideIndex.open(require_index(args), writable=True) as index:
        labels = read_labels(args.labels, index.sources())  # refuses a bad file before anything changes
        index.set_labels(labels)
        labelled = sum(row.label is not None for row in index.sources())
        print(f"labelled {len(labels)} slide(s) from {args.labels}; {labelled} of {len(index.sources())} indexed "
              f"source(s) have a label ({len({label for label, _ in labels.values()})} label(s) in this file)")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    if args.top_k < 1 or args.neighbours < 1:
        raise UserError(f"--top-k and --neighbours must be at least 1, got {args.top_k} and {args.neighbours}")
    mosaic = mosaic_from_args(args)
    settings = {"exclude": args.exclude, "top_k": args.top_k, "slide_score": args.slide_score,
                "neighbours": args.neighbours, "mosaic": mosaic.to_dict() if mosaic else None,
                "seed": mosaic.seed if mosaic else None}
    with SlideIndex.open(require_index(args)) as index:
        check_not_empty(index)
        evaluations = {exclude: rank_labelled_slides(index, exclude, args.slide_score, args.neighbours, args.top_k,
                                                     mosaic=mosaic) for exclude in dict.fromkeys(args.exclude)}
        rows = write_evaluation(args.out_dir, index, evaluations, settings)
    for row in rows:
        print(f"leave-one-{row['exclude']}-out, {row['queries']} queries: top-1 {row['top1_acc']:.3f}  MV@3 "
              f"{row['mv3_acc']:.3f}  MV@5 {row['mv5_acc']:.3f}  mMV@5 {row['mmv5']:.3f}  mAP@5 {row['map5_sish']:.3f} "
              f"(SISH) {row['map5_hits']:.3f} (hits)  query {row['query_ms_median']:.1f} ms median")
    print(f"slide_rankings.csv, slide_retrieval.csv, slide_retrieval_per_class.csv, the confusion matrix and "
          f"evaluation.json written to {args.out_dir}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    missing = 0
    with SlideIndex.open(require_index(args), writable=True) as index:
        for source in args.sources:
            row = index.source_by_path(os.path.abspath(source))
            if row is None:
                print(f"{source}: not in the index; `retrieve.py list --index {index.directory}` shows its sources",
                      file=sys.stderr)
                missing += 1
                continue
            print(f"{row.path}: removed {index.remove(row.id)} patches")
    return 1 if missing else 0


def describe_store(index: SlideIndex) -> str:
    """One line on the vector store: its dtype, live rows, and the space `compact` would give back."""
    if index.milvus is not None:
        return f"vectors: in {index.milvus.describe()}"
    stats = index.store_stats()
    return (f"vectors: {stats.dtype}, {stats.live_rows} live rows in {stats.chunks} chunk file(s); {stats.dead_rows} "
            f"dead rows ({stats.dead_bytes} bytes) reclaimable by `retrieve.py compact --index {index.directory}`")


def run_compact(args: argparse.Namespace) -> int:
    with SlideIndex.open(require_index(args), writable=True) as index:
        before = index.compact()
        after = index.store_stats()
        print(f"{index.directory}: compacted the vector store from {before.file_bytes} to {after.file_bytes} bytes "
              f"({after.live_rows} live rows in {after.chunks} chunk file(s))")
    return 0


def run_upgrade(args: argparse.Namespace) -> int:
    directory = require_index(args)
    moved = upgrade_index(directory)
    print(f"{directory}: " + (f"of index format {FORMAT}, nothing to convert" if moved is None else
                              f"converted to index format {FORMAT}, its vector store holds {moved} vectors"))
    return 0


def add_vector_index_args(parser: argparse.ArgumentParser, new: bool) -> None:
    """The faiss index's flags, shared by `index` (new: a new index's) and `reindex` (where a flag not
    given keeps the index's own setting); docs/slide_search.md."""
    otherwise = "; fixed when the index is created, `reindex` changes it" if new else "; reindex: the index's own"
    parser.add_argument("--index-type", choices=INDEX_TYPES, default=None,
                        help="faiss index: flat is exact; ivf, hnsw and ivfpq (compressed codes, for archives of "
                             f"millions of patches) are approximate and faster (default: flat{otherwise})")
    parser.add_argument("--ivf-lists", type=int, default=None,
                        help="lists of ivf and ivfpq (default: about 4 sqrt(n) of the vectors it is trained on)")
    parser.add_argument("--pq-bytes", type=int, default=None,
                        help=f"ivfpq: bytes of each vector's code, a divisor of the vector size (default: "
                             f"{DEFAULT_PQ_BYTES}{otherwise})")
    parser.add_argument("--opq", action=argparse.BooleanOptionalAction, default=None,
                        help=f"ivfpq: learn a rotation (OPQ) before the codes (default: off{otherwise})")
    parser.add_argument("--rerank", type=int, default=None, metavar="N",
                        help="ivfpq: re-score each query vector's best N candidates exactly from the stored vectors "
                             f"(default: 0, off{otherwise})")


def vector_index_choice(args: argparse.Namespace, current: IndexSettings | None = None) -> dict:
    """The vector-index settings the flags give; a flag not given takes `current`'s setting (reindex)
    or its default (a new index)."""
    chosen = {"index_type": "flat", "ivf_lists": None, "pq_bytes": DEFAULT_PQ_BYTES, "opq": False, "rerank": 0}
    if current is not None:
        chosen = {name: getattr(current, name) for name in chosen}
        if args.index_type not in (None, current.index_type):
            chosen["ivf_lists"] = None  # another type: its own default lists
    return {**chosen, **{name: getattr(args, name) for name in chosen if getattr(args, name) is not None}}


def run_reindex(args: argparse.Namespace) -> int:
    with SlideIndex.open(require_index(args), writable=True) as index:
        index.reindex(**vector_index_choice(args, index.settings))
        held = index.milvus.count() if index.milvus is not None else index.vectors.ntotal
        print(f"{index.directory}: rebuilt the index from {held} stored vectors: "
              f"{index.describe_vector_index()}")
    return 0


def run_serve(args: argparse.Namespace, device: torch.device) -> int:
    import uvicorn

    from histo_retrieval.search.service import SearchService
    from histo_retrieval.search.app import VIEWER_INSTALL, create_app, viewer_installed

    if not viewer_installed():
        raise UserError(f"the page's slide viewer (OpenSeadragon) is not installed; run `{VIEWER_INSTALL}` in "
                        f"{Path(__file__).resolve().parent} first")
    if not 1 <= args.top_k <= 100:
        raise UserError(f"--top-k must be from 1 to 100, got {args.top_k}")
    service = SearchService.open(require_index(args), device, args.checkpoint, args.batch_size, args.amp,
                                 args.channels_last, args.top_k, args.nprobe, args.ef_search, args.encoder_weights)
    summary = service.summary()
    print(f"index {args.index}: {summary['slides']} slide(s), {summary['folders']} folder(s), "
          f"{summary['patches']} patches ({service.index.settings.describe_encoder()}; {summary['mpp']} um/px)")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: serving on {args.host}, with no authentication; put a reverse proxy with authentication in "
              "front of it before sharing it on a network (docs/search_page.md, 'Security'); requests naming another "
              "host than 127.0.0.1, localhost, [::1], --host or --allowed-hosts are refused", file=sys.stderr)
    print(f"search page: http://{'localhost' if args.host in ('127.0.0.1', '::1') else args.host}:{args.port}/ "
          "(Ctrl+C stops it)", flush=True)
    try:
        uvicorn.run(create_app(service, allowed_hosts=[args.host, *args.allowed_hosts]), host=args.host,
                    port=args.port, log_level="warning", server_header=False)
    finally:
        service.close()
    return 0


def main(args: argparse.Namespace) -> int:
    """Run one sub-command; returns the exit status (1 when a source, query or image was left out)."""
    if args.command == "list":
        return run_list(args)
    if args.command == "remove":
        return run_remove(args)
    if args.command == "compact":
        return run_compact(args)
    if args.command == "upgrade":
        return run_upgrade(args)
    if args.command == "reindex":
        return run_reindex(args)
    if args.command == "label":
        return run_label(args)
    if args.command == "evaluate":
        return run_evaluate(args)
    check_settings(args.batch_size, args.amp)
    device = check_runtime(args)
    if args.command == "serve":
        return run_serve(args, device)
    if args.command == "embed":
        return run_embed(args, device)
    return run_index(args, device) if args.command == "index" else run_query(args, device)


if __name__ == "__main__":
    sys.exit(distributed.run_distributed_script(main, get_args_parser().parse_args()))
