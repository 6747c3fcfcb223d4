"""Stain normalisation (Macenko, through torchstain) and stain augmentation (HED jitter, through scikit-image).

    normalizer = load_stain_target("target.png")          # --stain-target: fit to one patch's stain
    out = normalizer(rgb)                                  # H x W x 3 uint8 -> the same, in the target's stain
    normalizer = MacenkoNormalizer.from_state(normalizer.state())   # JSON, kept with a checkpoint
    augment = StainAugment()                               # PIL -> PIL; random from torch's global RNG
    draw_stain_examples(rgb, normalizer, "docs/stain.png")

The colour maths is the libraries': torchstain's numpy backend (Macenko et al., ISBI 2009, after the
reference HEnorm_python; it needs neither torch nor tensorflow) and scikit-image's colour deconvolution
(`rgb2hed` / `hed2rgb`, Ruifrok and Johnston 2001). What this module adds is the policy around them:

- A patch whose stain cannot be estimated passes through unchanged and is counted (`passed_through`),
  never an error, so that glass and washed-out tiles in a data set cannot stop training. torchstain
  itself raises `numpy.linalg.LinAlgError` ("Eigenvalues did not converge") when no pixel is dark
  enough to count as stained (a white or near-white patch: the covariance of no pixels is NaN), and
  on a constant-colour patch returns two identical stain vectors and a meaningless image. We refuse,
  before or after its fit: fewer than 1% of the pixels stained (optical density >= beta in every
  channel, torchstain's own test), a failed or non-finite fit, stain vectors closer than 5 degrees
  (one stain, or none: the unmixing is ill-conditioned), or a concentration maximum <= 0. The same
  tests refuse a target (UserError), since every patch would inherit its failure.
- The pass-through count lives in shared memory, so DataLoader workers (forked or spawned) add to the
  main process's count.
- HED jitter keeps the part of a colour that `rgb2hed` cannot represent: it clamps negative stain
  amounts to 0, and for colours outside the cone of its H, E and DAB vectors (common: a third of the
  pixels of the synthetic "blue haematoxylin" palette) the plain round trip `hed2rgb(rgb2hed(x))` is
  off by up to 42 grey levels, a fixed, non-random shift between training and test images. The
  jitter is applied as a change relative to that round trip, so no jitter returns the input exactly;
  and its bias is in optical density, not in rgb2hed's rescaled units (hed_jitter).
"""
from __future__ import annotations

import math
import multiprocessing
import multiprocessing.context
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from histo_retrieval.figures import pyplot, save_figure

from histo_retrieval.errors import UserError, one_line
from histo_retrieval.images import UNREADABLE, load_rgb

# torchstain's (and the reference HEnorm_python's) defaults: transmitted light, the percentile of the
# angle extremes, and the optical density below which a channel counts as transparent.
IO = 240
ALPHA = 1
BETA = 0.15
# A pixel is stained when every channel's optical density -log((I + 1) / Io) >= BETA, that is
# I <= Io exp(-BETA) - 1 = 205.57: an integer threshold on uint8, torchstain's own test.
_STAINED_MAX = math.floor(IO * math.exp(-BETA) - 1)
MIN_STAINED_FRACTION = 0.01  # fewer stained pixels: a nearly white patch (glass, a whitened region)
MIN_STAINED_PIXELS = 10  # the floor for small patches: a covariance and percentiles need a few pixels
# Two stain vectors closer than this are one stain: a constant colour (torchstain's percentile extremes
# coincide), or an eosin so pale that only the nuclei pass BETA. The least-squares unmixing is then
# ill-conditioned (condition number ~ 1 / sin(angle)) and the result garbage. torchstain's reference
# matrix, from a real slide, has 22 degrees. On synthetic H&E mixtures, normalising made the mean
# colour worse for most patches estimated under 10 degrees and better for most above; 5 still lets the
# project's own synthetic patches serve (KIMIA_data/synthetic.py mixes both stains into every pixel:
# 4-41 degrees, median 12). Raise it for real data if single-stain patches come out garbled.
MIN_STAIN_ANGLE = 5.0  # degrees
_SKIMAGE_LIGHT_FLOOR = 1e-6  # rgb2hed raises light to at least this before its logarithm
RGB2HED_UNIT = -math.log(_SKIMAGE_LIGHT_FLOOR)  # rgb2hed's stain amounts are optical densities / ln(1e6)


# ----------------------------------------------------------------------------- normalisation
def _stain_problem(stain_matrix: np.ndarray, max_concentrations: np.ndarray) -> str | None:
    """Why a stain matrix (3 x 2, columns H and E in optical density) and its concentration maxima
    cannot serve, or None."""
    if stain_matrix.shape != (3, 2) or max_concentrations.shape != (2,):
        return (f"expected a 3x2 stain matrix and 2 maximum concentrations, got {list(stain_matrix.shape)} "
                f"and {list(max_concentrations.shape)}")
    if not (np.isfinite(stain_matrix).all() and np.isfinite(max_concentrations).all()):
        return "the stain matrix or the maximum concentrations are not finite"
    norms = np.linalg.norm(stain_matrix, axis=0)
    if not (norms > 0).all():
        return "a stain vector is zero"
    cosine = float(stain_matrix[:, 0] @ stain_matrix[:, 1] / (norms[0] * norms[1]))
    angle = math.degrees(math.acos(min(max(cosine, -1.0), 1.0)))
    if angle < MIN_STAIN_ANGLE:
        return (f"the two stain vectors are {angle:.2f} degrees apart "
                f"(at least {MIN_STAIN_ANGLE} needed: one stain, or none)")
    if not (max_concentrations > 0).all():
        return f"a maximum stain concentration is not positive ({max_concentrations.tolist()})"
    return None


def _as_rgb(rgb: Any) -> np.ndarray:
    array = np.asarray(rgb)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 uint8 array, got {array.dtype} of shape {array.shape}")
    return array


def _estimate_stain(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | str:
    """torchstain's Macenko estimate of an H x W x 3 uint8 patch, (stain matrix, maximum
    concentrations), or the reason there is none."""
    import torchstain

    pixels = rgb.reshape(-1, 3)
    stained = int(np.count_nonzero(pixels.max(axis=1) <= _STAINED_MAX))
    need = max(MIN_STAINED_PIXELS, math.ceil(MIN_STAINED_FRACTION * len(pixels)))
    if stained < need:
        return (f"{stained} of {len(pixels)} pixels are stained (every channel <= {_STAINED_MAX}), "
                f"at least {need} needed")
    probe = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    # A degenerate patch makes numpy warn (empty means, zero degrees of freedom) before it fails; the
    # failure is handled here, the warnings would only flood a DataLoader's log.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            probe.fit(rgb, Io=IO, alpha=ALPHA, beta=BETA)
        except np.linalg.LinAlgError as err:
            return f"Macenko's eigen-decomposition failed ({one_line(err)})"
    stain_matrix = np.asarray(probe.HERef, dtype=np.float64)
    max_concentrations = np.asarray(probe.maxCRef, dtype=np.float64)
    problem = _stain_problem(stain_matrix, max_concentrations)
    return problem if problem else (stain_matrix, max_concentrations)


def _shared_counter(value: int):
    """An integer in shared memory with its lock. Forked DataLoader workers inherit it; spawned (and
    forkserver) ones receive it while being started (MacenkoNormalizer.__getstate__). The lock comes
    from the spawn context because Python refuses to send a fork context's lock to a spawned process,
    while a forked one inherits any lock."""
    return multiprocessing.get_context("spawn").Value("q", value)


class MacenkoNormalizer:
    """Normalises patches to one target's stain (Macenko et al. 2009, through torchstain)."""

    def __init__(self, stain_matrix: np.ndarray, max_concentrations: np.ndarray, target: str | None = None) -> None:
        import torchstain

        stain_matrix = np.array(stain_matrix, dtype=np.float64)
        max_concentrations = np.array(max_concentrations, dtype=np.float64)
        problem = _stain_problem(stain_matrix, max_concentrations)
        if problem:
            raise UserError(f"stain target {target or '(unnamed)'}: {problem}; fit it again on a stained patch")
        self.stain_matrix = stain_matrix
        self.max_concentrations = max_concentrations
        self.target = target
        self._torchstain = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        self._torchstain.HERef = stain_matrix.copy()
        self._torchstain.maxCRef = max_concentrations.copy()
        self._count = _shared_counter(0)
        self._target_rgb: np.ndarray | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def fit(cls, target_rgb: np.ndarray, target: str | None = None) -> MacenkoNormalizer:
        """The normaliser to `target_rgb`'s stain (H x W x 3 uint8); UserError naming `target` when
        its stain cannot be estimated (a blank or white image, or a single stain)."""
        return cls._fit(target_rgb, target, f"stain target {target or '(unnamed image)'}")

    @classmethod
    def _fit(cls, target_rgb: np.ndarray, target: str | None, label: str) -> MacenkoNormalizer:
        rgb = _as_rgb(target_rgb)
        estimate = _estimate_stain(rgb)
        if isinstance(estimate, str):
            raise UserError(f"{label}: its stain cannot be estimated ({estimate}); "
                            "choose a patch of stained tissue")
        normalizer = cls(*estimate, target=target)
        normalizer._target_rgb = rgb.copy()  # for draw_stain_examples only; never pickled
        return normalizer

    def state(self) -> dict:
        """JSON-able: the method, the target's name, the 3x2 stain matrix and the 2 maximum concentrations."""
        return {"method": "macenko", "target": self.target, "stain_matrix": self.stain_matrix.tolist(),
                "max_concentrations": self.max_concentrations.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> MacenkoNormalizer:
        """The normaliser `state()` describes; UserError on a malformed state."""
        def bad(problem: str) -> UserError:
            return UserError(f"stain normalisation state: {problem}; fit the normaliser again (--stain-target)")

        if not isinstance(state, dict):
            raise bad(f"expected a dict, got {type(state).__name__}")
        if state.get("method") != "macenko":
            raise bad(f"method {state.get('method')!r} is not 'macenko'")
        missing = [key for key in ("stain_matrix", "max_concentrations") if key not in state]
        if missing:
            raise bad(f"{', '.join(missing)} missing")
        target = state.get("target")
        if target is not None and not isinstance(target, str):
            raise bad(f"target must be a string or null, got {type(target).__name__}")
        try:
            stain_matrix = np.array(state["stain_matrix"], dtype=np.float64)
            max_concentrations = np.array(state["max_concentrations"], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise bad(f"not numbers ({one_line(err)})") from None
        problem = _stain_problem(stain_matrix, max_concentrations)
        if problem:
            raise bad(problem)
        return cls(stain_matrix, max_concentrations, target)

    # ------------------------------------------------------------------ use
    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 -> H x W x 3 uint8 in the target's stain; a patch whose stain cannot be
        estimated comes back unchanged (the same array) and is counted."""
        array = _as_rgb(rgb)
        estimate = _estimate_stain(array)
        if isinstance(estimate, str):
            with self._count.get_lock():
                self._count.value += 1
            return array
        # torchstain's normalize estimates the patch again (its API returns no estimate): the price of
        # leaving the unmixing and the recomposition to it.
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            normalised, _, _ = self._torchstain.normalize(array, Io=IO, alpha=ALPHA, beta=BETA, stains=False)
        return normalised

    @property
    def passed_through(self) -> int:
        """Patches passed through unchanged so far, in this process and in its DataLoader workers."""
        return int(self._count.value)

    def reset_count(self) -> None:
        with self._count.get_lock():
            self._count.value = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_target_rgb"] = None  # workers and saved copies need the stain, not the picture
        if multiprocessing.context.get_spawning_popen() is None:
            # An ordinary pickle (a file, a deep copy) cannot carry shared memory: the count travels
            # as a number and the copy counts on its own.
            state["_count"] = self._count.value
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["_count"], int):
            state["_count"] = _shared_counter(state["_count"])
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"MacenkoNormalizer(target={self.target!r}, passed_through={self.passed_through})"


def load_stain_target(path: str) -> MacenkoNormalizer:
    """The normaliser to the stain of the image at `path` (--stain-target)."""
    try:
        image = load_rgb(path)
    except UNREADABLE as err:
        raise UserError(f"--stain-target {path}: cannot read the image ({one_line(err)}); "
                        "give an RGB image of the stain to match") from None
    return MacenkoNormalizer._fit(np.asarray(image), str(path), f"--stain-target {path}")


# ----------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class StainDraw:
    """One draw of StainAugment: per stain h' = h * hed_scale + hed_shift (optical density; see
    hed_jitter), then the brightness and contrast factors (torchvision's adjust_brightness / adjust_contrast)."""
    hed_scale: tuple[float, float, float]
    hed_shift: tuple[float, float, float]
    brightness: float
    contrast: float


def hed_jitter(rgb: np.ndarray, scale: Any, shift: Any) -> np.ndarray:
    """H x W x 3 uint8 -> the same with each stain of scikit-image's colour deconvolution (rgb2hed)
    scaled by `scale` and shifted by `shift` optical-density units (3 numbers each), back through
    hed2rgb, clipped, rounded: hed2rgb(rgb2hed(x) * scale + shift / ln(1e6)).

    rgb2hed's amounts are optical densities divided by ln(1e6) (its `log_adjust`, since 0.18), hence
    the shift's conversion: a shift means the same optical density whatever scikit-image's scaling.
    rgb2hed also clamps negative amounts to 0 (scikit-image #5172), so the plain round trip changes colours
    outside the cone of its H, E and DAB vectors; the ratio of the image to its round trip, that lost
    part of the light (>= 1), is carried over unchanged. Scale (1, 1, 1) and shift (0, 0, 0) return
    the input exactly, and inside the cone this is exactly the formula above."""
    from skimage.color import hed2rgb, rgb2hed

    light = rgb.astype(np.float64) / 255.0
    hed = rgb2hed(light)
    lost = np.maximum(light, _SKIMAGE_LIGHT_FLOOR) / hed2rgb(hed)
    moved = hed * np.asarray(scale, np.float64) + np.asarray(shift, np.float64) / RGB2HED_UNIT
    return np.rint(np.clip(hed2rgb(moved) * lost, 0.0, 1.0) * 255.0).astype(np.uint8)


class StainAugment:
    """Random stain variation for training: HED jitter (Tellez et al. 2018) then brightness and contrast jitter.

    Each of the H, E and DAB amounts of scikit-image's colour deconvolution becomes
    h * U(1 - hed_sigma, 1 + hed_sigma) + U(-hed_bias, hed_bias) (Tellez et al., IEEE TMI 2018,
    "Whole-slide mitosis detection in H&E breast histology using PHH3 as a reference to train distilled
    stain-invariant convolutional networks"); then the brightness and the contrast are scaled by
    U(1 - brightness, 1 + brightness) and U(1 - contrast, 1 + contrast), as torchvision's ColorJitter
    draws them.

    Defaults: hed_sigma = hed_bias = 0.05 is the "HED-light" setting of Tellez et al., Medical Image
    Analysis 2019, "Quantifying the effects of data augmentation and stain color normalization in
    convolutional neural networks for computational pathology" (their "HED-strong" is 0.2); the
    brightness and contrast ranges of 0.1 are this project's mild choice, not the papers'.

    The bias is in optical-density units (see hed_jitter). The papers' numbers do not carry over
    exactly: their HED space was scikit-image's before 0.18, -ln(rgb + 2) @ hed_from_rgb (a bug since
    fixed in #4725), in which the bias acts almost on the light itself. On this project's synthetic
    patches (KIMIA_data/synthetic.py, 5 classes x 4 palettes x 10 draws) their HED-light, re-created in
    that old space, changes a pixel by 21 grey levels on average, these defaults by 5 (hed_bias 0.3:
    23), and 0.05 read in today's rgb2hed units (0.69 optical density) by 46.

    All randomness comes from torch's global RNG (one torch.rand per image), so a DataLoader's
    per-worker seeding (torch.initial_seed) makes a run reproducible."""

    def __init__(self, hed_sigma: float = 0.05, hed_bias: float = 0.05, brightness: float = 0.1,
                 contrast: float = 0.1) -> None:
        values = {"hed_sigma": hed_sigma, "hed_bias": hed_bias, "brightness": brightness, "contrast": contrast}
        for name, value in values.items():
            # Below 1, so that every scale factor 1 - x stays positive (a factor <= 0 inverts or blanks).
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or not 0 <= value < 1):
                raise UserError(f"StainAugment {name}: {value!r} is not a number in [0, 1); "
                                "0 turns that variation off")
        self.hed_sigma, self.hed_bias = float(hed_sigma), float(hed_bias)
        self.brightness, self.contrast = float(brightness), float(contrast)

    def draw(self) -> StainDraw:
        """One random draw, from torch's global RNG (8 numbers, whatever the parameters)."""
        u = (torch.rand(8, dtype=torch.float64) * 2 - 1).tolist()  # U(-1, 1)
        return StainDraw(hed_scale=tuple(1 + self.hed_sigma * x for x in u[0:3]),
                         hed_shift=tuple(self.hed_bias * x for x in u[3:6]),
                         brightness=1 + self.brightness * u[6], contrast=1 + self.contrast * u[7])

    def apply(self, image: Image.Image, draw: StainDraw) -> Image.Image:
        """`image` varied by a given draw (a PIL image of the same size, RGB)."""
        from torchvision.transforms import functional

        rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
        out = Image.fromarray(hed_jitter(rgb, draw.hed_scale, draw.hed_shift))
        out = functional.adjust_brightness(out, draw.brightness)
        return functional.adjust_contrast(out, draw.contrast)

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.apply(image, self.draw())

    def __repr__(self) -> str:
        return (f"StainAugment(hed_sigma={self.hed_sigma}, hed_bias={self.hed_bias}, "
                f"brightness={self.brightness}, contrast={self.contrast})")


# ----------------------------------------------------------------------------- the figure
def _stain_swatch(normalizer: MacenkoNormalizer, size: int = 48) -> np.ndarray:
    """The target's haematoxylin (left) and eosin (right), each alone at its maximum concentration:
    torchstain's recomposition Io exp(-vector * concentration) of a single stain."""
    colours = IO * np.exp(-normalizer.stain_matrix * normalizer.max_concentrations)  # 3 x 2
    swatch = np.empty((size, 2 * size, 3), np.uint8)
    swatch[:, :size] = np.clip(colours[:, 0], 0, 255).astype(np.uint8)
    swatch[:, size:] = np.clip(colours[:, 1], 0, 255).astype(np.uint8)
    return swatch


def draw_stain_examples(image: np.ndarray, normalizer: MacenkoNormalizer | None, path: str, draws: int = 4,
                        seed: int = 0) -> None:
    """One figure: the patch and `draws` draws of StainAugment() (seeded by `seed`, leaving torch's
    global RNG as it was); with a normaliser a second row: the target (the image it was fitted on, in
    this process, or the file `target` names), its two stains, and the patch normalised to it."""
    rgb = _as_rgb(image)
    augment = StainAugment()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples = [augment.draw() for _ in range(draws)]
    varied = [np.asarray(augment.apply(Image.fromarray(rgb), d)) for d in samples]

    columns = max(1 + draws, 3 if normalizer is not None else 1)
    rows = 2 if normalizer is not None else 1
    plt = pyplot()
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title("patch", fontsize=8)
    for ax, d, pixels in zip(axes[0, 1:], samples, varied):
        ax.imshow(pixels)
        hed = " ".join(f"{c}x{s:.2f}{b:+.3f}" for c, s, b in zip("HED", d.hed_scale, d.hed_shift))
        ax.set_title(f"StainAugment\n{hed}\nbrightness x{d.brightness:.2f} contrast x{d.contrast:.2f}", fontsize=6)
    if normalizer is not None:
        target_image = normalizer._target_rgb
        if target_image is None and normalizer.target and os.path.isfile(normalizer.target):
            try:
                target_image = np.asarray(load_rgb(normalizer.target))
            except UNREADABLE:
                target_image = None
        name = os.path.basename(normalizer.target) if normalizer.target else "(unnamed)"
        if target_image is not None:
            axes[1, 0].imshow(target_image)
        axes[1, 0].set_title(f"target: {name}" + ("" if target_image is not None else "\n(image not at hand)"),
                             fontsize=8)
        axes[1, 1].imshow(_stain_swatch(normalizer))
        axes[1, 1].set_title("target's stains\nH | E at their maxima", fontsize=8)
        before = normalizer.passed_through
        normalised = normalizer(rgb)
        passed = normalizer.passed_through > before
        axes[1, 2].imshow(normalised)
        axes[1, 2].set_title("patch normalised to the target" + ("\n(passed through: no stain)" if passed else ""),
                             fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
