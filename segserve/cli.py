"""The `segserve` command. Each subcommand imports its part only when run, so `serve`
and `predict` work where torch is not installed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from segserve.contracts.architectures import MODEL_NAMES


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", required=True, help="VOC-layout folder (segserve data synth / data sbd make one)"
    )
    p.add_argument("--model", required=True, choices=MODEL_NAMES, help="the network to train")
    p.add_argument(
        "--out", required=True, type=Path,
        help="run folder: last.pt, best.pt, metrics.csv, config.json",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    recipe = p.add_argument_group(
        "recipe", "left out: the architecture's and stage's defaults (training/recipes.py): "
        "FCN as the authors' solvers (SGD, momentum 0.99, batch 1, whole images, fixed rate, "
        "biases 2x without decay, 100x lower rate per finer stage); U-Net SGD 0.9, poly decay",
    )  # fmt: skip
    recipe.add_argument("--batch-size", type=int, default=None, help="images per step")
    recipe.add_argument(
        "--crop-size", type=int, default=None, help="square training crop (padded with ignore)"
    )
    recipe.add_argument(
        "--scale", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
        help="random rescaling range before the crop",
    )  # fmt: skip
    recipe.add_argument(
        "--border-margin", type=int, default=0,
        help="pad each image by this many pixels (mean colour, ignored) before the crop, so "
        "crops hold image borders as served images do",
    )  # fmt: skip
    recipe.add_argument("--optimizer", choices=("sgd", "adamw"), default=None, help="optimiser")
    recipe.add_argument(
        "--lr", type=float, default=None,
        help="base learning rate (for the loss as --loss computes it; AdamW: 0.001)",
    )  # fmt: skip
    recipe.add_argument("--momentum", type=float, default=None, help="SGD momentum")
    recipe.add_argument("--weight-decay", type=float, default=None, help="L2 weight decay")
    recipe.add_argument(
        "--poly-power", type=float, default=None,
        help="lr = base * (1 - it/total) ** power; 0 keeps the rate fixed",
    )  # fmt: skip
    recipe.add_argument(
        "--loss", choices=("mean", "sum"), default=None,
        help="cross-entropy over labelled pixels: mean, or sum as the authors' Caffe nets "
        "(the same step needs the rate times the pixel count; see training/recipes.py)",
    )  # fmt: skip
    recipe.add_argument(
        "--class-weighting", choices=("none", "median", "sqrt"), default=None,
        help="median: median frequency balancing of the loss (rare classes weigh more); "
        "sqrt: its square root (the background is not made cheap to paint over)",
    )  # fmt: skip
    recipe.add_argument(
        "--bias-lr-mult", type=float, default=None, help="biases learn at this times the rate"
    )
    recipe.add_argument(
        "--bias-decay", action=argparse.BooleanOptionalAction, default=None,
        help="apply weight decay to biases",
    )  # fmt: skip
    p.add_argument(
        "--width", type=int, default=64, help="U-Net width (64 = the paper; 16 or 8 on a CPU)"
    )
    p.add_argument("--batch-norm", action="store_true", help="U-Net: batch norm after each conv")
    p.add_argument(
        "--backbone-weights", default=None,
        help="FCN (required without --init-from): 'imagenet' (torchvision), a VGG16 "
        "state-dict file, or 'none' to train from scratch knowingly",
    )  # fmt: skip
    p.add_argument(
        "--init-from", type=Path, default=None,
        help="staged FCN: a trained coarser FCN checkpoint (32s -> 16s -> 8s)",
    )  # fmt: skip
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last.pt"
    )
    p.add_argument(
        "--stop-after", type=int, default=None, metavar="N",
        help="train at most N epochs in this invocation, then exit (time-limited jobs; continue with --resume)",
    )  # fmt: skip
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="auto: CUDA when torch sees it (the local rank's under torchrun)",
    )  # fmt: skip
    p.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=True,
        help="mixed precision: float16 on CUDA, bfloat16 on CPUs that compute it natively",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true",
        help="torch.compile the training step (about 1.15x on CPU after a minute of compiling)",
    )  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="data-loading processes per rank")
    p.add_argument("--seed", type=int, default=0, help="same seed, same run (on one device)")
    p.add_argument(
        "--max-train-images", type=int, default=None, help="use only the first N training images"
    )
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True,
        help="progress bars and a line per epoch",
    )  # fmt: skip


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="VOC-layout folder")
    p.add_argument("--checkpoint", required=True, type=Path, help="a training checkpoint (.pt)")
    p.add_argument("--split", default="val", help="ImageSets/Segmentation/SPLIT.txt to score")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _data_synth(args: argparse.Namespace) -> int:
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
    summary = write_dataset(args.out, config, progress=True)
    print(
        f"\n{'split':<12}{'images':>8}\n{'train':<12}{summary['train']:>8}\n{'val':<12}{summary['val']:>8}"
    )
    print(f"\n{'class':<12}{'pixels':>8}")
    for name, frac in summary["class_fraction"].items():
        print(f"{name:<12}{frac:>8.1%}")
    print(f"\nwrote {args.out} (VOC layout, classes.json beside it)")
    return 0


def _data_sbd(args: argparse.Namespace) -> int:
    from segserve.training.sbd import SBDError, write_paper_split

    try:
        summary = write_paper_split(
            args.sbd, args.voc, args.out, link=args.link, val_list=args.val_list
        )
    except SBDError as exc:
        print(f"segserve data sbd: {exc}", file=sys.stderr)
        return 1
    for key, value in summary.items():
        print(f"{key:<28}{value:>8}")
    print(f"\nwrote {args.out} (VOC layout)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from segserve.training.train import METRIC_COLUMNS, TrainConfig, train

    row = train(TrainConfig.from_mapping(vars(args)))
    if row:
        print(f"\n{'epochs':<16}{row['epoch']:>10}")
        for key in METRIC_COLUMNS:
            if key not in ("epoch", "lr", "epoch_s"):
                print(f"{key:<16}{row[key]:>10.4f}")
        print(f"\nrun folder: {args.out} (best.pt, last.pt, metrics.csv, config.json)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from segserve.training.evaluate import run_eval

    run_eval(args.data, args.checkpoint, args.split, args.device, args.json)
    return 0


def _export(args: argparse.Namespace) -> int:
    from segserve.export.onnx_export import ParityError, export_checkpoint
    from segserve.training.checkpoint import CheckpointError

    try:
        result = export_checkpoint(
            args.checkpoint, args.repository, args.name, version=args.version, fp16=args.fp16,
            output=args.output, input=args.input, force=args.force, optimize=args.optimize,
        )  # fmt: skip
    except (CheckpointError, FileExistsError, ParityError, ValueError) as exc:
        print(f"segserve export: {exc}", file=sys.stderr)
        return 1
    p = result.parity
    print(f"\n{'shape':<20}{'max |dlogits|':>16}{'agreement':>12}")
    for row in p.per_shape:
        diff = "-" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.2e}"
        print(f"{'x'.join(map(str, row['shape'])):<20}{diff:>16}{row['agreement']:>12.4%}")
    print(f"\n{'written':<14}{result.path}")
    print(f"{'file size':<14}{result.file_bytes / 1e6:.1f} MB")
    print(f"{'export time':<14}{result.export_s:.1f} s")
    print(f"{'output':<14}{result.card.output} ({result.card.output_dtype})")
    print(
        f"{'parity':<14}max |dlogits| {p.max_abs_diff if p.max_abs_diff is not None else '-'}, agreement {p.agreement:.4%}: passed"
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from segserve.export.importer import ImportRefused, import_model

    try:
        folder = import_model(
            args.model, args.repository, args.name, version=args.version, force=args.force,
            classes=args.classes, mean=args.mean, std=args.std, output_name=args.output_name,
            input_layout=args.input_layout, size_divisor=args.size_divisor,
            architecture=args.architecture,
        )  # fmt: skip
    except (ImportRefused, FileExistsError, FileNotFoundError) as exc:
        print(f"segserve import: {exc}", file=sys.stderr)
        return 1
    card = json.loads((folder / "model.json").read_text())
    print(f"{'written':<14}{folder / 'model.onnx'}")
    for key in (
        "input_name",
        "input_dtype",
        "input_layout",
        "output_name",
        "output",
        "num_classes",
    ):
        print(f"{key:<14}{card[key]}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from segserve.service.imaging import ImageDecodeError, ImageTooLarge
    from segserve.service.predict import predict_files

    try:
        predict_files(args.images, args.model, args.out, args.format)
    except (ImageDecodeError, ImageTooLarge, FileNotFoundError) as exc:
        print(f"segserve predict: {exc}", file=sys.stderr)
        return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from segserve.service import logs
    from segserve.service.app import create_app
    from segserve.service.protocol import guarded_protocol
    from segserve.service.settings import Settings

    overrides = {"repository": args.repository} if args.repository is not None else {}
    settings = Settings(**overrides)
    logs.configure(settings.log_format)
    # uvicorn handles SIGTERM: it stops accepting, lets open requests finish (queued ones
    # included, up to the request deadline), then runs the app's shutdown, which drains
    # the batchers.
    uvicorn.run(
        create_app(settings), host=args.host, port=args.port, log_config=None,
        access_log=False,  # segserve.request logs each request, with its id and timings
        http=guarded_protocol(settings.max_header_bytes, settings.idle_timeout_s),
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 1,
    )  # fmt: skip
    return 0


def _bench(args: argparse.Namespace) -> int:
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
            target, args.concurrency, args.duration, images, progress=not args.json,
            server_pid=args.server_pid,
        )  # fmt: skip
    except ConnectionError as exc:
        print(f"segserve bench: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
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


def _bootstrap(args: argparse.Namespace) -> int:
    from segserve.export.bootstrap import bootstrap

    bootstrap(args.repository, args.work_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segserve", description=__doc__, formatter_class=_Formatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data sets", formatter_class=_Formatter)
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser(
        "synth", help="write a synthetic VOC-layout data set", formatter_class=_Formatter
    )
    synth.add_argument("--out", required=True, type=Path, help="the folder to write")
    synth.add_argument("--count", required=True, type=int, help="images in all (train + val)")
    synth.add_argument("--seed", type=int, default=0, help="same seed, same images")
    synth.add_argument("--min-size", type=int, default=160, help="smallest image side, px")
    synth.add_argument("--max-size", type=int, default=512, help="largest image side, px")
    synth.add_argument(
        "--val-fraction", type=float, default=0.2, help="share of the images in the val split"
    )
    synth.add_argument("--max-objects", type=int, default=8, help="objects per image, at most")
    synth.add_argument(
        "--object-scale", type=float, nargs=2, default=(0.12, 0.75), metavar=("LOW", "HIGH"),
        help="object size range, as a share of the image's short side (log-uniform)",
    )  # fmt: skip
    synth.set_defaults(func=_data_synth)

    sbd = data_sub.add_parser(
        "sbd",
        help="the paper's training set: SBD train minus VOC2012 val, validated on seg11valid",
        description="Reads a local SBD folder (benchmark_RELEASE/dataset: cls/*.mat, img/, "
        "train.txt, val.txt) and a local VOC2012 folder, downloads nothing, and writes one "
        "VOC-layout folder: train = SBD train + val minus every VOC2012 segmentation val "
        "image; val = seg11valid (the VOC2011 segmentation val images not in SBD train).",
        formatter_class=_Formatter,
    )  # fmt: skip
    sbd.add_argument("--sbd", required=True, type=Path, help="SBD's dataset/ folder")
    sbd.add_argument("--voc", required=True, type=Path, help="VOC2012 folder (VOCdevkit/VOC2012)")
    sbd.add_argument("--out", required=True, type=Path, help="the VOC-layout folder to write")
    sbd.add_argument(
        "--val-list", type=Path, default=None,
        help="the val ids (e.g. the authors' seg11valid.txt with a VOC2012 folder); default: "
        "the VOC folder's ImageSets/Segmentation/val.txt (VOC2011's gives seg11valid)",
    )  # fmt: skip
    sbd.add_argument(
        "--link", action=argparse.BooleanOptionalAction, default=True,
        help="hard-link JPEGs instead of copying them (when on the same file system)",
    )  # fmt: skip
    sbd.set_defaults(func=_data_sbd)

    train = sub.add_parser(
        "train", help="train FCN-32s/16s/8s or U-Net", formatter_class=_Formatter
    )
    add_train_args(train)
    train.set_defaults(func=_train)

    evaluate = sub.add_parser(
        "eval", help="the four metrics of a checkpoint on a split", formatter_class=_Formatter
    )
    add_eval_args(evaluate)
    evaluate.set_defaults(func=_eval)

    export = sub.add_parser(
        "export", help="checkpoint -> ONNX in the model repository", formatter_class=_Formatter
    )
    export.add_argument("--checkpoint", required=True, type=Path, help="a training checkpoint")
    export.add_argument("--repository", required=True, type=Path, help="the model repository")
    export.add_argument("--name", required=True, help="the model's name in the repository")
    export.add_argument("--version", type=int, default=None, help="default: one past the newest")
    export.add_argument(
        "--fp16", action="store_true", help="float16 weights and activations (and float input)"
    )
    export.add_argument(
        "--output", choices=("labels", "logits"), default="labels",
        help="labels: argmax in the graph, uint8 [N,H,W]; logits: the scores [N,C,H,W]",
    )  # fmt: skip
    export.add_argument(
        "--input", choices=("uint8", "float"), default="uint8",
        help="uint8: RGB pixels [N,H,W,3], normalised in the graph; float: [N,3,H,W] normalised "
        "by the caller (older segserve models)",
    )  # fmt: skip
    export.add_argument("--force", action="store_true", help="overwrite an existing version")
    export.add_argument(
        "--optimize",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="save onnxruntime's basic graph optimisations in the file (measured: no faster on CPU, "
        "slower to load; sessions optimise at load anyway, see docs/benchmarks.md)",
    )
    export.set_defaults(func=_export)

    imp = sub.add_parser(
        "import", help="bring a segmentation ONNX file from elsewhere into the model repository",
        formatter_class=_Formatter,
    )  # fmt: skip
    imp.add_argument(
        "model",
        type=Path,
        help="the ONNX file (e.g. torchvision FCN/DeepLabV3/LRASPP via torch.onnx)",
    )
    imp.add_argument("--repository", required=True, type=Path, help="the model repository folder")
    imp.add_argument("--name", required=True, help="the model's name in the repository")
    imp.add_argument("--version", type=int, default=None, help="default: one past the newest")
    imp.add_argument(
        "--classes", default=None,
        help="voc (PASCAL VOC's 21), or a JSON file with class_names (and palette); default: "
        "class0.. as many as the output's channels",
    )  # fmt: skip
    imp.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                     help="normalisation of float inputs, 0..1 scale (default: ImageNet's)")  # fmt: skip
    imp.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                     help="normalisation of float inputs (default: ImageNet's)")  # fmt: skip
    imp.add_argument("--output-name", default=None,
                     help="the segmentation output when the graph has several (default: 'out' or the only one)")  # fmt: skip
    imp.add_argument("--input-layout", choices=("NCHW", "NHWC"), default=None,
                     help="default: from the input's shape (the dimension of size 3)")  # fmt: skip
    imp.add_argument("--size-divisor", type=int, default=1,
                     help="the stride the network needs its input padded to when batching sizes together")  # fmt: skip
    imp.add_argument("--architecture", default="imported", help="a name for the card")
    imp.add_argument("--force", action="store_true", help="overwrite an existing version")
    imp.set_defaults(func=_import)

    predict = sub.add_parser(
        "predict",
        help="segment image files with a model file, no server",
        formatter_class=_Formatter,
    )
    predict.add_argument("images", nargs="+", type=Path, help="image files")
    predict.add_argument("--model", required=True, type=Path, help="PATH.onnx")
    predict.add_argument("--out", required=True, type=Path, help="folder for the results")
    predict.add_argument(
        "--format", choices=("png", "overlay"), default="png",
        help="png: label PNG (palette mode); overlay: the image with class colours",
    )  # fmt: skip
    predict.set_defaults(func=_predict)

    serve = sub.add_parser(
        "serve", help="serve the model repository over HTTP",
        description="Settings also come from SEGSERVE_* environment variables (see README).",
        formatter_class=_Formatter,
    )  # fmt: skip
    serve.add_argument(
        "--repository",
        type=Path,
        default=None,
        help="default: $SEGSERVE_REPOSITORY or model_repository",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every one)"
    )
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    serve.set_defaults(func=_serve)

    bench = sub.add_parser(
        "bench",
        help="load-test a running server: POST /segment, or v2 infer on any KServe/Triton server",
        formatter_class=_Formatter,
    )
    bench.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000")
    bench.add_argument(
        "--protocol", choices=("segment", "v2"), default="segment",
        help="segment: encoded images to POST /segment; v2: UINT8 [1,H,W,3] binary tensors to "
        "/v2/models/MODEL/infer (segserve, Triton, KServe)",
    )  # fmt: skip
    bench.add_argument(
        "--model", default=None, help="model name (v2: required; segment: default model if unset)"
    )
    bench.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4, 16],
        help="closed-loop workers; one run per level",
    )  # fmt: skip
    bench.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    bench.add_argument(
        "--images", type=Path, default=None,
        help="a folder of images (default: synthetic JPEGs of --sizes)",
    )  # fmt: skip
    bench.add_argument(
        "--sizes", default="512x512,375x500", help="HxW list for the synthetic images"
    )
    bench.add_argument(
        "--format", choices=("png", "json"), default="png", help="segment: the answer format"
    )
    bench.add_argument(
        "--multipart", action="store_true",
        help="segment: send the image as form field 'image' instead of the raw body",
    )  # fmt: skip
    bench.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    bench.add_argument(
        "--server-pid", type=int, default=None,
        help="a server process on this machine: report its CPU time per request (from /proc)",
    )  # fmt: skip
    bench.add_argument(
        "--json", action="store_true",
        help="print one JSON object (url, protocol, model, images, runs: one entry per level) "
        "instead of the table",
    )  # fmt: skip
    bench.add_argument("--json-out", type=Path, default=None, help="also write that JSON here")
    bench.add_argument(
        "--plot", type=Path, default=None,
        help="PNG of latency percentiles (log scale) and throughput vs concurrency",
    )  # fmt: skip
    bench.set_defaults(func=_bench)

    boot = sub.add_parser(
        "bootstrap",
        help="build the default model unet-shapes when the repository has none",
        formatter_class=_Formatter,
    )
    boot.add_argument(
        "--repository", type=Path, default=Path("model_repository"), help="the model repository"
    )
    boot.add_argument("--work-dir", type=Path, default=Path("."), help="where data/ and runs/ go")
    boot.set_defaults(func=_bootstrap)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
