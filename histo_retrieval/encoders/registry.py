"""One entry point from an encoder spec to an Encoder, and the flags every tool shares.

    encoder = load_encoder("model/se_resnet50_MSLoss_0.1234.pth")            # a checkpoint of this project
    encoder = load_encoder("timm:vit_small_patch16_224", weights="vit_s.safetensors",
                           options={"dynamic_img_size": True})                  # any timm architecture
    encoder = load_encoder("uni")                                               # a preset (local weights)
    encoder = load_encoder("histogram")                                         # the colour-histogram baseline

A spec is `histogram`, `timm:<architecture>`, the name of a preset (histo_retrieval.encoders.presets),
or else the path of a checkpoint written by train.py or of a bare reference state_dict.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
from typing import Any, NamedTuple

import torch

from histo_retrieval.data.datasets import InputSteps
from histo_retrieval.data.preprocessing import Preprocessing
from histo_retrieval.encoders.base import Encoder
from histo_retrieval.encoders.histogram import DEFAULT_BINS, ColourHistogram
from histo_retrieval.encoders.presets import PRESETS
from histo_retrieval.encoders.project import REFERENCE_CROP_SIZE, load_model
from histo_retrieval.encoders.timm_encoders import (check_architecture, create_timm_model, load_weights, pool,
                                                    timm_input_steps, vector_size)
from histo_retrieval.errors import UserError

__all__ = ["HISTOGRAM", "RANDOM_WEIGHTS", "TIMM_PREFIX", "EncoderRequest", "add_encoder_args", "check_encoder_spec",
           "encoder_from_args", "encoder_names", "encoder_requests", "is_named_encoder", "load_encoder",
           "parse_encoder_options"]

HISTOGRAM = "histogram"
TIMM_PREFIX = "timm:"
RANDOM_WEIGHTS = "random"  # --encoder-weights random: timm's own random initialisation, seeded (benchmarks, tests)
RANDOM_SEED = 0


def encoder_names() -> list[str]:
    """The named encoders (every spec but a checkpoint path and `timm:<architecture>`)."""
    return [HISTOGRAM, *PRESETS]


def is_named_encoder(spec: str) -> bool:
    """Whether `spec` names an encoder rather than a checkpoint file."""
    return spec.startswith(TIMM_PREFIX) or spec.lower() in encoder_names()


def check_encoder_spec(spec: str, weights: str | os.PathLike | None = None, options: dict[str, Any] | None = None,
                       crop_size: int | None = None) -> None:
    """The checks load_encoder makes before building anything, so that a tool can refuse a bad spec
    before its long work: UserError (one line) for an unknown spec or timm architecture, weights or
    options given to a checkpoint, --crop-size given to a named encoder, a timm: spec without weights,
    a preset whose weights are not found."""
    name = spec.lower()
    if not is_named_encoder(spec):
        if not os.path.exists(spec) and not spec.endswith((".pth", ".pt")):
            close = difflib.get_close_matches(name, encoder_names(), n=3, cutoff=0.5)
            raise UserError(f"--encoder {spec}: neither a checkpoint file nor a known encoder "
                            f"({'did you mean ' + ', '.join(close) + '? ' if close else ''}known: "
                            f"{', '.join(encoder_names())}, timm:<architecture>)")
        if weights or options:
            raise UserError(f"--encoder {spec}: a checkpoint holds its own weights and options; "
                            "--encoder-weights and --encoder-options are for timm:, presets and the histogram")
        return
    if crop_size is not None:
        raise UserError(f"--crop-size: {spec} has its own input size; --crop-size is for checkpoints of this project")
    if name.startswith(TIMM_PREFIX):
        check_architecture(spec[len(TIMM_PREFIX):])
        if not weights:
            raise UserError(f"{spec}: pass its weights with --encoder-weights FILE (.pth, .bin or .safetensors), or "
                            f"--encoder-weights {RANDOM_WEIGHTS} for a randomly initialised network")
    elif name in PRESETS and weights != RANDOM_WEIGHTS:
        PRESETS[name].weights_file(weights)


def load_encoder(spec: str, device: torch.device | str = "cpu", weights: str | os.PathLike | None = None,
                 options: dict[str, Any] | None = None, crop_size: int | None = None) -> Encoder:
    """The encoder `spec` names, in eval mode on `device`.

    `weights`: the state_dict file of a timm architecture or a preset (`random` for timm's random
    initialisation, seeded). `options`: timm create_model keyword arguments (for a preset, they
    override its own; for the histogram, {"bins": N}). `crop_size`: a checkpoint's input size other
    than the one it records (checkpoints only: the other encoders' input steps are their own).
    UserError (one line naming the file or spec) when it cannot be built.
    """
    name = spec.lower()
    check_encoder_spec(spec, weights, options, crop_size)
    if not is_named_encoder(spec):
        return load_model(spec, device, crop_size)
    if name == HISTOGRAM:
        return _histogram(options or {}, weights)
    if name.startswith(TIMM_PREFIX):
        encoder = _timm(spec[len(TIMM_PREFIX):], weights, options or {})
    else:
        encoder = _preset(name, weights, options or {})
    encoder.model.to(device)
    return encoder


def _histogram(options: dict[str, Any], weights: str | os.PathLike | None) -> Encoder:
    if weights:
        raise UserError("--encoder-weights: the colour histogram has no weights")
    unknown = set(options) - {"bins", "crop_size"}
    if unknown:
        raise UserError(f"--encoder-options {sorted(unknown)}: the histogram takes bins and crop_size only")
    bins = int(options.get("bins", DEFAULT_BINS))
    if not 1 <= bins <= 256:
        raise UserError(f"--encoder-options bins: must be 1 to 256, got {bins}")
    steps = InputSteps(int(options.get("crop_size", REFERENCE_CROP_SIZE)))
    return Encoder(ColourHistogram(bins), HISTOGRAM, "histogram", HISTOGRAM,
                   {"bins": bins, "crop_size": steps.crop_size}, steps, bins ** 3, source="histogram",
                   pooling=f"joint RGB histogram, {bins} bins per channel")


def _timm(architecture: str, weights: str | os.PathLike, options: dict[str, Any]) -> Encoder:
    model = _built(architecture, options, weights)
    steps, preprocessing = timm_input_steps(model)
    return Encoder(pool(model, "pooled"), f"{TIMM_PREFIX}{architecture}", "timm", architecture, options, steps,
                   vector_size(model, "pooled"), _weights_label(weights), preprocessing, pooling="pooled",
                   source="timm")


def _preset(name: str, weights: str | os.PathLike | None, options: dict[str, Any]) -> Encoder:
    preset = PRESETS[name]
    path = weights if weights == RANDOM_WEIGHTS else preset.weights_file(weights)
    built_with = {**preset.options, **options}
    model = _built(preset.architecture, built_with, path)
    return Encoder(pool(model, preset.pooling), name, "preset", preset.architecture, built_with, preset.input_steps,
                   vector_size(model, preset.pooling), _weights_label(path), Preprocessing(preset.mean, preset.std),
                   mpp=preset.mpp, pooling=preset.pooling, source="preset")


def _built(architecture: str, options: dict[str, Any], weights: str | os.PathLike) -> torch.nn.Module:
    if weights == RANDOM_WEIGHTS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            return create_timm_model(architecture, options)
    model = create_timm_model(architecture, options)
    load_weights(model, weights)
    return model


def _weights_label(weights: str | os.PathLike) -> str:
    return RANDOM_WEIGHTS if weights == RANDOM_WEIGHTS else os.path.abspath(weights)


# ----------------------------------------------------------------------------- the shared flags
def parse_encoder_options(text: str) -> dict[str, Any]:
    """--encoder-options: a JSON object of keyword arguments."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err.msg} at character {err.pos}); e.g. "
                                         "'{\"init_values\": 1e-5, \"dynamic_img_size\": true}'") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError("expected a JSON object of keyword arguments, e.g. '{\"init_values\": 1e-5}'")
    return options


class EncoderRequest(NamedTuple):
    """One --encoder of a command that takes several, with the weights and options given after it."""

    spec: str
    weights: str | None = None
    options: dict[str, Any] | None = None


class _AddEncoder(argparse.Action):
    """--encoder SPEC, repeatable: a new entry in args.encoder, with no weights and options yet."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        for dest, item in (("encoder", value), ("encoder_weights", None), ("encoder_options", None)):
            setattr(namespace, dest, [*(getattr(namespace, dest, None) or []), item])


class _ForLastEncoder(argparse.Action):
    """--encoder-weights and --encoder-options, repeatable: they belong to the --encoder just before them."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        specs, values = getattr(namespace, "encoder", None) or [], list(getattr(namespace, self.dest, None) or [])
        if not specs:
            parser.error(f"{option_string} belongs to an --encoder: put it after the --encoder SPEC it is for")
        if values[-1] is not None:
            parser.error(f"{option_string} given twice for --encoder {specs[-1]}")
        values[-1] = value
        setattr(namespace, self.dest, values)


def add_encoder_args(parser: argparse.ArgumentParser, required: bool = False, spec_help: str = "",
                     repeatable: bool = False) -> None:
    """--encoder SPEC, --encoder-weights FILE and --encoder-options JSON, the same in every tool.

    `repeatable`: --encoder may be given several times, each followed by its own --encoder-weights
    and --encoder-options (read them with encoder_requests)."""
    each = (" Repeatable: --encoder-weights and --encoder-options belong to the --encoder just before them, e.g. "
            "--encoder timm:resnet18 --encoder-weights r18.pth --encoder histogram.") if repeatable else ""
    parser.add_argument("--encoder", required=required, default=None, metavar="SPEC",
                        action=_AddEncoder if repeatable else "store",
                        help=(spec_help or "the encoder: a checkpoint of this project, timm:<architecture>, a preset "
                              f"({', '.join(PRESETS)}) or {HISTOGRAM} (docs/encoders.md; default: none)") + each)
    parser.add_argument("--encoder-weights", default=None, metavar="FILE",
                        action=_ForLastEncoder if repeatable else "store",
                        help="state_dict of a timm: or preset encoder (.pth, .bin or .safetensors), or "
                             f"'{RANDOM_WEIGHTS}' for a randomly initialised timm network (default: none; a preset "
                             "looks in its weights folder and the Hugging Face cache)")
    parser.add_argument("--encoder-options", type=parse_encoder_options, default=None, metavar="JSON",
                        action=_ForLastEncoder if repeatable else "store",
                        help="timm create_model keyword arguments, e.g. '{\"dynamic_img_size\": true}'; for the "
                             "histogram, '{\"bins\": 8}' (default: none)")


def encoder_requests(args: argparse.Namespace) -> list[EncoderRequest]:
    """Every --encoder of a command whose flags are repeatable, with its own weights and options, in order."""
    specs = args.encoder or []
    return [EncoderRequest(spec, weights, options)
            for spec, weights, options in zip(specs, args.encoder_weights or [None] * len(specs),
                                              args.encoder_options or [None] * len(specs))]


def encoder_from_args(args: argparse.Namespace, device: torch.device | str = "cpu",
                      spec: str | None = None) -> Encoder:
    """The encoder the shared flags name (`spec` when the command takes it another way)."""
    return load_encoder(spec or args.encoder, device, args.encoder_weights, args.encoder_options,
                        getattr(args, "crop_size", None))
