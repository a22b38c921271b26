"""The `segserve` command. Each subcommand's options sit beside the function that runs it;
each part is imported only when its command runs, so `serve` and `predict` work where torch
is not installed. Errors a user can fix (segserve.errors.UserError, a missing or existing
file) print one line and exit 1; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path

from segserve.contracts.architectures import MODEL_NAMES
from segserve.contracts.card import DEFAULT_FIT_PIXELS, SCALE_POLICIES
from segserve.errors import UserError

Subcommands = argparse._SubParsersAction  # what add_subparsers returns


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def command(
    sub: Subcommands, name: str, run: Callable[[argparse.Namespace], int], help: str
) -> argparse.ArgumentParser:
    """A subcommand's parser, run by `run`; its --help description is `run`'s docstring."""
    description = inspect.getdoc(run)
    p = sub.add_parser(name, help=help, description=description, formatter_class=_Formatter)
    p.set_defaults(func=run)
    return p


def summary(rows: list[tuple[str, object]], title: tuple[str, str] | None = None) -> None:
    """The summary table long commands end with: a name and a value a row."""
    width = max(len(name) for name, _ in [*rows, *([title] if title else [])]) + 2
    lines = [f"{title[0]:<{width}}{title[1]:>10}"] if title else []
    lines += [f"{name:<{width}}{value!s:>10}" for name, value in rows]
    print("\n" + "\n".join(lines))


# -- data ------------------------------------------------------------------------------


def add_data_synth(sub: Subcommands) -> None:
    p = command(sub, "synth", run_data_synth, help="write a synthetic VOC-layout data set")
    p.add_argument("--out", required=True, type=Path, help="the folder to write")
    p.add_argument("--count", required=True, type=int, help="images in all (train + val)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same images")
    p.add_argument("--min-size", type=int, default=160, help="smallest image side, px")
    p.add_argument("--max-size", type=int, default=512, help="largest image side, px")
    p.add_argument(
        "--val-fraction", type=float, default=0.2, help="share of the images in the val split"
    )
    p.add_argument("--max-objects", type=int, default=8, help="objects per image, at most")
    p.add_argument(
        "--object-scale",
        type=float,
        nargs=2,
        default=(0.12, 0.75),
        metavar=("LOW", "HIGH"),
        help="object size range, as a share of the image's short side (log-uniform)",
    )


def run_data_synth(args: argparse.Namespace) -> int:
    from segserve.training.synth import SynthConfig, write_dataset

    config = SynthConfig(
        count=args.count,
        seed=args.seed,
        min_size=args.min_size,
        max_size=args.max_size,
        val_fraction=args.val_fraction,
        max_objects=args.max_objects,
        object_scale=tuple(args.object_scale),
    )
    written = write_dataset(args.out, config, progress=True)
    summary([(split, written[split]) for split in ("train", "val")], ("split", "images"))
    fractions = [(name, f"{frac:.1%}") for name, frac in written["class_fraction"].items()]
    summary(fractions, ("class", "pixels"))
    print(f"\nwrote {args.out} (VOC layout, classes.json beside it)")
    return 0


def add_data_sbd(sub: Subcommands) -> None:
    help = "the paper's training set: SBD train minus VOC2012 val, validated on seg11valid"
    p = command(sub, "sbd", run_data_sbd, help)
    p.add_argument("--sbd", required=True, type=Path, help="SBD's dataset/ folder")
    p.add_argument("--voc", required=True, type=Path, help="VOC2012 folder (VOCdevkit/VOC2012)")
    p.add_argument("--out", required=True, type=Path, help="the VOC-layout folder to write")
    p.add_argument(
        "--val-list",
        type=Path,
        default=None,
        help="the val ids (e.g. the authors' seg11valid.txt with a VOC2012 folder); default: "
        "the VOC folder's ImageSets/Segmentation/val.txt (VOC2011's gives seg11valid)",
    )
    p.add_argument(
        "--link",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hard-link JPEGs instead of copying them (when on the same file system)",
    )


def run_data_sbd(args: argparse.Namespace) -> int:
    """Reads a local SBD folder (benchmark_RELEASE/dataset: cls/*.mat, img/, train.txt,
    val.txt) and a local VOC2012 folder, downloads nothing, and writes one VOC-layout folder:
    train = SBD train + val minus every VOC2012 segmentation val image; val = seg11valid (the
    VOC2011 segmentation val images not in SBD train)."""
    from segserve.training.sbd import write_paper_split

    summary = write_paper_split(
        args.sbd, args.voc, args.out, link=args.link, val_list=args.val_list
    )
    for key, value in summary.items():
        print(f"{key:<28}{value:>8}")
    print(f"\nwrote {args.out} (VOC layout)")
    return 0


# -- train, eval -----------------------------------------------------------------------


def add_train(sub: Subcommands) -> None:
    p = command(sub, "train", run_train, help="train FCN-32s/16s/8s or U-Net")
    p.add_argument(
        "--data", required=True, help="VOC-layout folder (segserve data synth / data sbd make one)"
    )
    p.add_argument("--model", required=True, choices=MODEL_NAMES, help="the network to train")
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="run folder: last.pt, best.pt, metrics.csv, config.json",
    )
    p.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    recipe = p.add_argument_group(
        "recipe",
        "left out: the architecture's and stage's defaults (training/recipes.py): "
        "FCN as the authors' solvers (SGD, momentum 0.99, batch 1, whole images, fixed rate, "
        "biases 2x without decay, 100x lower rate per finer stage); U-Net SGD 0.9, poly decay",
    )
    recipe.add_argument("--batch-size", type=int, default=None, help="images per step")
    recipe.add_argument(
        "--crop-size", type=int, default=None, help="square training crop (padded with ignore)"
    )
    recipe.add_argument(
        "--scale",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="random rescaling range before the crop",
    )
    recipe.add_argument(
        "--border-margin",
        type=int,
        default=0,
        help="pad each image by this many pixels (mean colour, ignored) before the crop, so "
        "crops hold image borders as served images do",
    )
    recipe.add_argument("--optimizer", choices=("sgd", "adamw"), default=None, help="optimiser")
    recipe.add_argument(
        "--lr",
        type=float,
        default=None,
        help="base learning rate (for the loss as --loss computes it; AdamW: 0.001)",
    )
    recipe.add_argument("--momentum", type=float, default=None, help="SGD momentum")
    recipe.add_argument("--weight-decay", type=float, default=None, help="L2 weight decay")
    recipe.add_argument(
        "--poly-power",
        type=float,
        default=None,
        help="lr = base * (1 - it/total) ** power; 0 keeps the rate fixed",
    )
    recipe.add_argument(
        "--loss",
        choices=("mean", "sum"),
        default=None,
        help="cross-entropy over labelled pixels: mean, or sum as the authors' Caffe nets "
        "(the same step needs the rate times the pixel count; see training/recipes.py)",
    )
    recipe.add_argument(
        "--class-weighting",
        choices=("none", "median", "sqrt"),
        default=None,
        help="median: median frequency balancing of the loss (rare classes weigh more); "
        "sqrt: its square root (the background is not made cheap to paint over)",
    )
    recipe.add_argument(
        "--bias-lr-mult", type=float, default=None, help="biases learn at this times the rate"
    )
    recipe.add_argument(
        "--bias-decay",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply weight decay to biases",
    )
    p.add_argument(
        "--width", type=int, default=64, help="U-Net width (64 = the paper; 16 or 8 on a CPU)"
    )
    p.add_argument("--batch-norm", action="store_true", help="U-Net: batch norm after each conv")
    p.add_argument(
        "--backbone-weights",
        default=None,
        help="FCN (required without --init-from): 'imagenet' (torchvision), a VGG16 "
        "state-dict file, or 'none' to train from scratch knowingly",
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="staged FCN: a trained coarser FCN checkpoint (32s -> 16s -> 8s)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last.pt"
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="train at most N epochs in this invocation, then exit (time-limited jobs; continue with --resume)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when torch sees it (the local rank's under torchrun)",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="arithmetic: auto = float16 on CUDA, bfloat16 on CPUs that compute it natively, "
        "else float32; the others force one",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training step (about 1.15x on CPU after a minute of compiling)",
    )
    p.add_argument("--workers", type=int, default=2, help="data-loading processes per rank")
    p.add_argument("--seed", type=int, default=0, help="same seed, same run (on one device)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bars and a line per epoch",
    )
    p.add_argument(
        "--max-train-images", type=int, default=None, help="use only the first N training images"
    )


def run_train(args: argparse.Namespace) -> int:
    from segserve.training.train import METRIC_COLUMNS, TrainConfig, train

    row = train(TrainConfig.from_mapping(vars(args)))
    if row:
        scores = [
            (k, f"{row[k]:.4f}") for k in METRIC_COLUMNS if k not in ("epoch", "lr", "epoch_s")
        ]
        summary([("epochs", row["epoch"]), *scores])
        print(f"\nrun folder: {args.out} (best.pt, last.pt, metrics.csv, config.json)")
    return 0


def add_eval(sub: Subcommands) -> None:
    p = command(sub, "eval", run_eval, help="the four metrics of a checkpoint on a split")
    p.add_argument("--data", required=True, help="VOC-layout folder")
    p.add_argument("--checkpoint", required=True, type=Path, help="a training checkpoint (.pt)")
    p.add_argument("--split", default="val", help="ImageSets/Segmentation/SPLIT.txt to score")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run_eval(args: argparse.Namespace) -> int:
    from segserve.training.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.data, args.checkpoint, args.split, args.device, args.json)
    return 0


# -- into the model repository ---------------------------------------------------------


def add_version_target(p: argparse.ArgumentParser) -> None:
    """Where export and import write: REPO/NAME/VERSION, never over a version without --force."""
    p.add_argument("--repository", required=True, type=Path, help="the model repository")
    p.add_argument("--name", required=True, help="the model's name in the repository")
    p.add_argument("--version", type=int, default=None, help="default: one past the newest")
    p.add_argument("--force", action="store_true", help="overwrite an existing version")


def add_scale_options(p: argparse.ArgumentParser, default: str, why: str) -> None:
    """How the card says the network meets a large image (docs/design.md, "Scale")."""
    p.add_argument(
        "--scale",
        choices=SCALE_POLICIES,
        default=default,
        help=f"the scale policy requests get unless they ask for the other; {default}: {why}",
    )
    p.add_argument(
        "--tile-halo",
        type=int,
        default=None,
        help="native: px of context each tile brings around what it keeps (default: the "
        "architecture's measured halo, contracts/architectures.py; 128 for a foreign network)",
    )
    p.add_argument(
        "--fit-pixels",
        type=int,
        default=DEFAULT_FIT_PIXELS,
        help="fit: the working size images are scaled down to, in pixels",
    )


def add_int8_options(p: argparse.ArgumentParser, export: bool) -> None:
    """The images an int8 variant is calibrated on and checked against (export/quantize.py)."""
    from segserve.export.quantize import DEFAULT_CALIBRATION_IMAGES, DEFAULT_HELD_OUT_IMAGES

    if export:
        p.add_argument(
            "--int8",
            action="store_true",
            help="also write an int8 variant (model.int8.onnx), calibrated on --data and "
            "refused (nothing published) unless it agrees with float32 on held-out images",
        )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        required=not export,
        help="the images to calibrate on: a VOC-layout folder (its train split; its val split "
        "with labels is held out) or a folder of images (the first to calibrate, the next "
        "held out)" + ("; default: the data the checkpoint was trained on" if export else ""),
    )
    p.add_argument(
        "--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES, help="how many"
    )
    p.add_argument(
        "--held-out-images",
        type=int,
        default=DEFAULT_HELD_OUT_IMAGES,
        help="how many images the int8 variant must agree with float32 on",
    )


def add_export(sub: Subcommands) -> None:
    p = command(sub, "export", run_export, help="checkpoint -> ONNX in the model repository")
    p.add_argument("--checkpoint", required=True, type=Path, help="a training checkpoint")
    add_version_target(p)
    p.add_argument(
        "--fp16", action="store_true", help="float16 weights and activations (and float input)"
    )
    p.add_argument(
        "--output",
        choices=("labels", "logits"),
        default="labels",
        help="labels: argmax in the graph, uint8 [N,H,W]; logits: the scores [N,C,H,W]",
    )
    p.add_argument(
        "--input",
        choices=("uint8", "float"),
        default="uint8",
        help="uint8: [N,H,W,3] pixels normalised in the graph; float: [N,3,H,W], by the caller",
    )
    add_scale_options(
        p,
        "native",
        "the network sees the image at its own resolution, in "
        "overlapping tiles past one tile (segserve's networks are fully "
        "convolutional and trained at the scale of their images)",
    )
    add_int8_options(p, export=True)
    p.add_argument(
        "--optimize",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="save onnxruntime's basic graph optimisations in the file (measured: no faster on "
        "CPU, slower to load; sessions optimise at load anyway, see docs/benchmarks.md)",
    )


def run_export(args: argparse.Namespace) -> int:
    from segserve.export.onnx_export import export_checkpoint

    result = export_checkpoint(
        args.checkpoint,
        args.repository,
        args.name,
        version=args.version,
        fp16=args.fp16,
        output=args.output,
        input=args.input,
        force=args.force,
        optimize=args.optimize,
        scale=args.scale,
        tile_halo=args.tile_halo,
        fit_pixels=args.fit_pixels,
        int8=args.int8,
        int8_data=args.data,
        calibration_images=args.calibration_images,
        held_out_images=args.held_out_images,
    )
    p = result.parity
    shapes = [
        (
            "x".join(map(str, r["shape"])),
            f"{'-' if r['max_abs_diff'] is None else format(r['max_abs_diff'], '.2e')}  {r['agreement']:.4%}",
        )
        for r in p.per_shape
    ]
    summary(shapes, ("shape", "max |dlogits|  agreement"))
    max_abs = p.max_abs_diff if p.max_abs_diff is not None else "-"
    summary(
        [
            ("written", result.path),
            ("file size", f"{result.file_bytes / 1e6:.1f} MB"),
            ("export time", f"{result.export_s:.1f} s"),
            ("output", f"{result.card.output} ({result.card.output_dtype})"),
            ("parity", f"max |dlogits| {max_abs}, agreement {p.agreement:.4%}: passed"),
        ]
    )
    say_check_set(result.path.parent.parent)
    return 0


def add_quantize(sub: Subcommands) -> None:
    help = "an int8 variant of a version in the repository, gated on agreement with float32"
    p = command(sub, "quantize", run_quantize, help)
    p.add_argument("--repository", required=True, type=Path, help="the model repository")
    p.add_argument("--name", required=True, help="the model's name in the repository")
    p.add_argument("--version", type=int, default=None, help="default: the newest")
    p.add_argument("--force", action="store_true", help="make model.int8.onnx again")
    add_int8_options(p, export=False)


def run_quantize(args: argparse.Namespace) -> int:
    from segserve.export.quantize import quantize_version

    result = quantize_version(
        args.repository,
        args.name,
        args.version,
        args.data,
        args.calibration_images,
        args.held_out_images,
        args.force,
    )
    r = result.report
    rows = [
        ("written", result.path),
        ("file size", f"{result.file_bytes / 1e6:.1f} MB"),
        ("agreement", f"{r.agreement:.4%} of {r.held_out['pixels']:,} held-out pixels"),
    ]
    if r.mean_iu is not None:
        rows.append(
            ("mean IU", f"int8 {r.mean_iu['int8']:.4f}, float32 {r.mean_iu['float32']:.4f}")
        )
    summary(rows)
    return 0


def add_import(sub: Subcommands) -> None:
    help = "bring a segmentation ONNX file from elsewhere into the model repository"
    p = command(sub, "import", run_import, help)
    p.add_argument(
        "model",
        type=Path,
        help="the ONNX file (e.g. torchvision FCN/DeepLabV3/LRASPP via torch.onnx)",
    )
    add_version_target(p)
    p.add_argument(
        "--classes",
        default=None,
        help="voc (PASCAL VOC's 21), or a JSON file with class_names (and palette); default: "
        "class0.. as many as the output's channels",
    )
    p.add_argument(
        "--mean",
        type=float,
        nargs=3,
        default=None,
        metavar=("R", "G", "B"),
        help="normalisation of float inputs, 0..1 scale (default: ImageNet's)",
    )
    p.add_argument(
        "--std",
        type=float,
        nargs=3,
        default=None,
        metavar=("R", "G", "B"),
        help="normalisation of float inputs (default: ImageNet's)",
    )
    p.add_argument(
        "--output-name",
        default=None,
        help="the segmentation output when the graph has several (default: 'out' or the only one)",
    )
    p.add_argument(
        "--input-layout",
        choices=("NCHW", "NHWC"),
        default=None,
        help="default: from the input's shape (the dimension of size 3)",
    )
    p.add_argument(
        "--size-divisor",
        type=int,
        default=1,
        help="the stride the network needs its input padded to when batching sizes together",
    )
    p.add_argument("--architecture", default="imported", help="a name for the card")
    add_scale_options(
        p,
        "fit",
        "images are scaled to --fit-pixels first (a foreign network's "
        "training scale is unknown, and photos-trained networks expect this)",
    )


def run_import(args: argparse.Namespace) -> int:
    from segserve.export.importer import import_model

    folder = import_model(
        args.model,
        args.repository,
        args.name,
        version=args.version,
        force=args.force,
        classes=args.classes,
        mean=args.mean,
        std=args.std,
        output_name=args.output_name,
        input_layout=args.input_layout,
        size_divisor=args.size_divisor,
        architecture=args.architecture,
        scale=args.scale,
        tile_halo=args.tile_halo,
        fit_pixels=args.fit_pixels,
    )
    card = json.loads((folder / "model.json").read_text())
    keys = (
        "input_name",
        "input_dtype",
        "input_layout",
        "output_name",
        "output",
        "num_classes",
        "scale_policy",
        "tile_halo",
    )
    summary([("written", folder / "model.onnx"), *((k, card[k]) for k in keys)])
    say_check_set(folder.parent)
    return 0


def say_check_set(model_dir: Path) -> None:
    """After a new version: whether the server will gate it, and how to make it so."""
    check = model_dir / "checkset" / "ImageSets" / "Segmentation" / "val.txt"
    if check.is_file():
        print(f"check set: {check.parents[2]}: a server scores this version before it serves")
    else:
        print(
            f"no check set at {model_dir / 'checkset'}: servers let this version serve ungated; "
            "add labelled images there in VOC layout (JPEGImages/, SegmentationClass/, "
            "ImageSets/Segmentation/val.txt) to gate versions on their scores "
            "(docs/operations.md, 'Rolling out a new model')"
        )


# -- serving ---------------------------------------------------------------------------


def add_predict(sub: Subcommands) -> None:
    p = command(sub, "predict", run_predict, "segment image files with a model file, no server")
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.add_argument("--model", required=True, type=Path, help="PATH.onnx")
    p.add_argument("--out", required=True, type=Path, help="folder for the results")
    p.add_argument(
        "--format",
        choices=("png", "overlay"),
        default="png",
        help="png: label PNG (palette mode); overlay: the image with class colours",
    )
    p.add_argument(
        "--scale",
        choices=SCALE_POLICIES,
        default=None,
        help="native: at the image's own resolution, in tiles past one tile; fit: scaled "
        "down first (default: the model card's)",
    )
    add_variant_option(p)


def add_variant_option(p: argparse.ArgumentParser) -> None:
    from segserve.service.runtime.variants import VARIANT_NAMES

    p.add_argument(
        "--variant",
        choices=("auto", *VARIANT_NAMES),
        default=None,
        help="the runtime x arithmetic to run (default: $SEGSERVE_VARIANT, else auto: the "
        "fastest candidate measured here that passes its check, as the server chooses)",
    )


def load_settings(**overrides):
    """The service's settings (SEGSERVE_* variables, `overrides` over them); a setting that
    is wrong is a UserError naming it, not a traceback."""
    from pydantic import ValidationError

    from segserve.service.settings import Settings

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise UserError(f"invalid settings: {problems}") from None


def settings_from(args: argparse.Namespace):
    """SEGSERVE_* settings, with the command line's --variant over them."""
    return load_settings(**({"variant": args.variant} if args.variant else {}))


def run_predict(args: argparse.Namespace) -> int:
    """The same steps and limits as POST /segment (SEGSERVE_* settings apply)."""
    from segserve.service.predict import predict_files

    predict_files(
        args.images, args.model, args.out, args.format, settings_from(args), scale=args.scale
    )
    return 0


def add_batch(sub: Subcommands) -> None:
    help = "segment a data set as a job: one output per input, a Parquet manifest, resumable"
    p = command(sub, "batch", run_batch, help)
    p.add_argument(
        "input",
        help="a folder (every image below it), a glob, or a CSV/Parquet manifest with a "
        "'path' column; local paths or fsspec URLs (s3://..., gs://...)",
    )
    p.add_argument("--model", required=True, type=Path, help="a version's model.onnx (its variants beside it) or any ONNX file with a card")  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="the output folder (shared by every node of a cluster)")  # fmt: skip
    p.add_argument("--format", choices=("png", "overlay", "json"), default="png",
                   help="as /segment's format: label PNG, overlay PNG, or the JSON answer")  # fmt: skip
    p.add_argument("--scale", choices=SCALE_POLICIES, default=None, help="default: the card's")
    add_variant_option(p)
    p.add_argument("--engine", choices=("auto", "ray", "local"), default="auto",
                   help="auto: Ray Data on the cluster --ray-address (or RAY_ADDRESS) names, "
                   "else this process; ray: a local Ray when no cluster is named")  # fmt: skip
    p.add_argument("--ray-address", default=None,
                   help="a Ray cluster's address (default: $RAY_ADDRESS, else a local Ray)")  # fmt: skip
    p.add_argument("--actors", type=int, default=None, help="Ray actors (default: the cluster's cores / --threads)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="images at once per actor (default: the smallest node's cores, at most 4; local: the cores)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, help="images per Ray Data batch")
    p.add_argument("--overwrite", action="store_true", help="replace another model's outputs in --out")  # fmt: skip
    p.add_argument("--max-error-rate", type=float, default=0.01, help="exit 2 if a larger share of the inputs failed")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_batch(args: argparse.Namespace) -> int:
    """Every input gets one output at its relative path (extension .png; _overlay.png or
    .json for the other formats), written under a temporary name and renamed, and one row in
    OUT/manifest.parquet (id, input, output, size, model, version, model sha256, the variant
    that served it, status, error, ms). Run it again to finish a stopped job: inputs whose
    output exists with a row of the same model are skipped. A bad input is an error row; the
    job goes on. The same decode limits, scale policy, tiles and variant choice as POST
    /segment and segserve predict (SEGSERVE_* settings apply)."""
    import os

    from segserve.batch.job import BatchJob
    from segserve.batch.job import run_batch as run

    job = BatchJob(
        args.input, args.model, args.out, args.format, args.scale, args.engine,
        args.ray_address or os.environ.get("RAY_ADDRESS"), args.actors, args.threads,
        args.batch_size, args.overwrite, args.max_error_rate, not args.no_progress,
    )  # fmt: skip
    result = run(job, settings_from(args))
    print(result.line())
    if result.error_rate > args.max_error_rate:
        print(
            f"segserve batch: {result.error_rate:.2%} of the inputs failed, over the "
            f"{args.max_error_rate:.2%} allowed (--max-error-rate); see {args.out}/manifest.parquet",
            file=sys.stderr,
        )
        return 2
    return 0


def add_serve(sub: Subcommands) -> None:
    p = command(sub, "serve", run_serve, "serve the model repository over HTTP")
    p.add_argument("--host", default="127.0.0.1", help="interface (0.0.0.0: every one)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="also serve the Open Inference Protocol over gRPC here (8001 by convention; "
        "default: $SEGSERVE_GRPC_PORT, else off); needs the grpc extra",
    )
    p.add_argument(
        "--repository",
        type=Path,
        default=None,
        help="default: $SEGSERVE_REPOSITORY or model_repository",
    )


def run_serve(args: argparse.Namespace) -> int:
    """Settings also come from SEGSERVE_* environment variables (see README)."""
    from segserve.service.server import serve
    from segserve.service.telemetry import logs

    overrides: dict = {"repository": args.repository} if args.repository is not None else {}
    if args.grpc_port is not None:
        overrides["grpc_port"] = args.grpc_port
    settings = load_settings(**overrides)
    logs.configure(settings.log_format)
    serve(settings, args.host, args.port)
    return 0


def add_bench(sub: Subcommands) -> None:
    help = "load-test a running server: POST /segment, or v2 infer on any KServe/Triton server"
    p = command(sub, "bench", run_bench, help)
    p.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--protocol",
        choices=("segment", "v2"),
        default="segment",
        help="segment: encoded images to POST /segment; v2: UINT8 [1,H,W,3] binary tensors to "
        "/v2/models/MODEL/infer (segserve, Triton, KServe)",
    )
    p.add_argument(
        "--model", default=None, help="model name (v2: required; segment: default model if unset)"
    )
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 4, 16],
        help="closed-loop workers; one run per level",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    p.add_argument(
        "--images",
        type=Path,
        default=None,
        help="a folder of images (default: synthetic JPEGs of --sizes)",
    )
    p.add_argument("--sizes", default="512x512,375x500", help="HxW list for the synthetic images")
    p.add_argument(
        "--format", choices=("png", "json"), default="png", help="segment: the answer format"
    )
    p.add_argument(
        "--multipart",
        action="store_true",
        help="segment: send the image as form field 'image' instead of the raw body",
    )
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="a server process on this machine: report its CPU time per request (from /proc)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (url, protocol, model, images, runs: one entry per level) "
        "instead of the table",
    )
    p.add_argument("--json-out", type=Path, default=None, help="also write that JSON here")
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="PNG of latency percentiles (log scale) and throughput vs concurrency",
    )


def run_bench(args: argparse.Namespace) -> int:
    from segserve import loadgen
    from segserve.service.settings import parse_shapes

    images = (
        loadgen.folder_images(args.images)
        if args.images
        else loadgen.synthetic_images(parse_shapes(args.sizes))
    )
    target = loadgen.Target(
        args.url, args.protocol, args.model, args.format, args.api_key, args.multipart
    )
    try:
        results = loadgen.bench(
            target,
            args.concurrency,
            args.duration,
            images,
            progress=not args.json,
            server_pid=args.server_pid,
        )
    except ConnectionError as exc:
        raise UserError(f"cannot reach {args.url}: {exc}") from exc
    report = loadgen.to_json(target, args.duration, images, results)
    if args.json:
        print(report)
    else:
        print(f"{args.url}  {len(images)} images  {args.duration:.0f} s per level\n")
        print(loadgen.format_table(results))
    if args.plot:
        loadgen.plot(results, args.plot, title=f"segserve bench {args.url}")
        if not args.json:
            print(f"\nplot: {args.plot}")
    if args.json_out:
        args.json_out.write_text(report + "\n")
    return 0


# -- the default model -----------------------------------------------------------------


def add_init(sub: Subcommands) -> None:
    help = "put the shipped default model (unet-shapes) into a repository that holds none"
    p = command(sub, "init", run_init, help)
    p.add_argument(
        "--repository", type=Path, default=Path("model_repository"), help="the model repository"
    )


def run_init(args: argparse.Namespace) -> int:
    from segserve.default_model import install

    install(args.repository)
    return 0


def add_bootstrap(sub: Subcommands) -> None:
    help = "rebuild the default model unet-shapes from scratch: data, training, export"
    p = command(sub, "bootstrap", run_bootstrap, help)
    p.add_argument(
        "--repository",
        type=Path,
        default=Path("model_repository"),
        help="where the rebuilt model is exported (as the next version of unet-shapes)",
    )
    p.add_argument("--work-dir", type=Path, default=Path("."), help="where data/ and runs/ go")
    p.add_argument("--estimate-only", action="store_true", help="say what it would cost, then stop")


def run_bootstrap(args: argparse.Namespace) -> int:
    """Says first what the training will cost on this machine (its arithmetic, and minutes
    estimated from a short timed step), then runs the recipe the shipped model was made with.
    Resumes an interrupted run in --work-dir."""
    from segserve.export.bootstrap import bootstrap

    bootstrap(args.repository, args.work_dir, estimate_only=args.estimate_only)
    return 0


# -- the parser and the one error wrapper ----------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segserve", description=__doc__, formatter_class=_Formatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="data sets", formatter_class=_Formatter)
    data_sub = data.add_subparsers(dest="data_command", required=True)
    for add in (add_data_synth, add_data_sbd):
        add(data_sub)
    for add in (
        add_train,
        add_eval,
        add_export,
        add_quantize,
        add_import,
        add_predict,
        add_batch,
        add_serve,
        add_bench,
        add_init,
        add_bootstrap,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
    try:
        return args.func(args)
    except (UserError, FileExistsError, FileNotFoundError) as exc:
        print(f"segserve {command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
