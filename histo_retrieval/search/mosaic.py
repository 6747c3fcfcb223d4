"""Yottixel's mosaic: a few tissue patches per slide that cover every kind of tissue and every part of it.

    grid = tissue_grid(slide, tiling)                  # every tissue patch, found on the thumbnail
    chosen = select_mosaic(grid, MosaicSettings())     # indices into grid.positions, ascending
    small = mosaic_grid(grid, MosaicSettings())        # the same grid holding the mosaic only

After Kalra et al., "Yottixel – An Image Search Engine for Large Archives of Histopathology Whole
Slide Images", Medical Image Analysis 2020. The rule, as implemented here:

1. The colour of each of the slide's n tissue patches is the mean RGB (0-255) of its footprint on
   the thumbnail the tissue was found on (the same footprint, rounded to thumbnail pixels, that
   `tissue_grid` measures the tissue fraction of).
2. k-means on those colours with k = min(clusters, n) groups (scikit-learn KMeans, random_state =
   seed, n_init = 10). Yottixel clusters a colour histogram; the mean colour is what a thumbnail of
   8 pixels per patch side measures reliably.
3. In each colour cluster c of n_c patches, m_c = max(1, ceil(percent / 100 * n_c)) patches are
   chosen: k-means with m_c groups on the patches' level-0 centres (same random_state and n_init),
   then, for each position centroid in turn, the patch of the cluster nearest it that is not chosen
   yet (ties to the patch first in the grid). The mosaic therefore holds sum_c m_c patches.
4. The chosen patches are returned in the grid's order (row by row from the top-left), whatever the
   clusters' numbering.

Only the thumbnail is read: choosing a mosaic reads no full-resolution pixels.
"""
from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from histo_retrieval.errors import UserError
from histo_retrieval.search.slides import Slide, TissueGrid, Tiling, tissue_grid

N_INIT = 10  # k-means restarts: fixed, so that a seed fixes the mosaic


@dataclass(frozen=True)
class MosaicSettings:
    """How a slide's mosaic is chosen: `clusters` colour clusters, `percent` of each cluster's
    patches (at least one), k-means seeded with `seed`."""
    clusters: int = 9
    percent: float = 5.0
    seed: int = 0

    def check(self) -> None:
        if self.clusters < 1:
            raise UserError(f"--mosaic-clusters must be at least 1, got {self.clusters}")
        if not 0 < self.percent <= 100:
            raise UserError(f"--mosaic-percent is a share of each cluster's patches, above 0 and at most 100, "
                            f"got {self.percent}")

    def to_dict(self) -> dict:
        return {"clusters": self.clusters, "percent": self.percent, "seed": self.seed}

    @classmethod
    def from_dict(cls, values: dict) -> MosaicSettings:
        return cls(int(values["clusters"]), float(values["percent"]), int(values["seed"]))

    def describe(self) -> str:
        return f"{self.clusters} colour clusters, {self.percent:g}% of each, seed {self.seed}"


def add_mosaic_args(parser: argparse.ArgumentParser) -> None:
    """--mosaic and its settings (retrieve.py index and query)."""
    default = MosaicSettings()
    parser.add_argument("--mosaic", action="store_true",
                        help="use each slide's Yottixel mosaic instead of all its tissue patches (default: off)")
    parser.add_argument("--mosaic-clusters", type=int, default=default.clusters,
                        help="colour clusters of the mosaic, fewer on a slide with fewer patches "
                             "(default: %(default)s; with --mosaic)")
    parser.add_argument("--mosaic-percent", type=float, default=default.percent,
                        help="percent of each colour cluster's patches in the mosaic, at least one "
                             "(default: %(default)s; with --mosaic)")
    parser.add_argument("--mosaic-seed", type=int, default=default.seed,
                        help="seed of the mosaic's k-means (default: %(default)s; with --mosaic)")


def mosaic_from_args(args: argparse.Namespace) -> MosaicSettings | None:
    """The mosaic the arguments ask for, None without --mosaic; its settings alone are refused
    rather than silently ignored."""
    settings = MosaicSettings(args.mosaic_clusters, args.mosaic_percent, args.mosaic_seed)
    if not args.mosaic:
        changed = [flag for flag, value, default in
                   (("--mosaic-clusters", settings.clusters, MosaicSettings.clusters),
                    ("--mosaic-percent", settings.percent, MosaicSettings.percent),
                    ("--mosaic-seed", settings.seed, MosaicSettings.seed)) if value != default]
        if changed:
            raise UserError(f"{', '.join(changed)} given without --mosaic; add --mosaic to use a mosaic")
        return None
    settings.check()
    return settings


def cluster_share(size: int, percent: float) -> int:
    """The patches chosen from a colour cluster of `size` patches: max(1, ceil(percent / 100 * size))."""
    # round() first: 5% of 20 is 1.0000000000000002 in floating point, and must stay 1
    return max(1, math.ceil(round(percent / 100 * size, 9)))


def patch_colours(grid: TissueGrid) -> np.ndarray:
    """n x 3 float64: the mean RGB of each tissue patch's footprint on the grid's thumbnail."""
    thumbnail, downsample = grid.thumbnail, grid.thumbnail_downsample
    height, width = thumbnail.shape[:2]
    size0 = grid.read.size0
    summed = np.stack([_integral(thumbnail[..., channel].astype(np.float64)) for channel in range(3)], axis=-1)

    def cell(values: np.ndarray, limit: int) -> np.ndarray:
        return np.clip(np.round(values / downsample).astype(np.int64), 0, limit)

    x, y = grid.positions[:, 0], grid.positions[:, 1]
    left, top = cell(x, width), cell(y, height)
    right = np.maximum(cell(x + size0, width), left + 1).clip(max=width)
    bottom = np.maximum(cell(y + size0, height), top + 1).clip(max=height)
    left, top = np.minimum(left, right - 1), np.minimum(top, bottom - 1)  # a patch on the last pixel keeps one
    area = ((right - left) * (bottom - top))[:, None]
    return (summed[bottom, right] - summed[top, right] - summed[bottom, left] + summed[top, left]) / area


def _integral(channel: np.ndarray) -> np.ndarray:
    out = np.zeros((channel.shape[0] + 1, channel.shape[1] + 1))
    out[1:, 1:] = channel.cumsum(0).cumsum(1)
    return out


def _kmeans(points: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, centroids) of k-means; points with fewer distinct values than k give fewer clusters,
    which is no error here (a slide of one colour is one colour cluster)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = KMeans(n_clusters=k, random_state=seed, n_init=N_INIT).fit(points)
    return model.labels_, model.cluster_centers_


def colour_clusters(grid: TissueGrid, settings: MosaicSettings) -> np.ndarray:
    """The colour cluster of each tissue patch (step 2 of the rule)."""
    n = len(grid.positions)
    if n == 0:
        return np.zeros(0, np.int64)
    labels, _ = _kmeans(patch_colours(grid), min(settings.clusters, n), settings.seed)
    return labels.astype(np.int64)


def select_mosaic(grid: TissueGrid, settings: MosaicSettings) -> np.ndarray:
    """Indices into grid.positions of the slide's mosaic, ascending (the module's rule)."""
    settings.check()
    labels = colour_clusters(grid, settings)
    centres = grid.positions.astype(np.float64) + grid.read.size0 / 2
    chosen: list[int] = []
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        share = cluster_share(len(members), settings.percent)
        _, centroids = _kmeans(centres[members], share, settings.seed)
        free = np.ones(len(members), bool)
        for centroid in centroids:
            distances = np.where(free, ((centres[members] - centroid) ** 2).sum(1), np.inf)
            nearest = int(np.argmin(distances))  # argmin: ties to the first in the grid
            free[nearest] = False
            chosen.append(int(members[nearest]))
    return np.array(sorted(chosen), np.int64)


def mosaic_grid(grid: TissueGrid, settings: MosaicSettings) -> TissueGrid:
    """The grid holding only its mosaic's patches (same read plan and thumbnail)."""
    keep = select_mosaic(grid, settings)
    return replace(grid, positions=grid.positions[keep], tissue=grid.tissue[keep])


def slide_mosaic(slide: Slide, tiling: Tiling, settings: MosaicSettings) -> TissueGrid:
    """The slide's tissue grid reduced to its mosaic: reads the slide's thumbnail only."""
    return mosaic_grid(tissue_grid(slide, tiling), settings)
