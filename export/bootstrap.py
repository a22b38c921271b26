"""The default model: when the repository holds none, build `unet-shapes` from scratch
(synthetic data, a short CPU training run of a width-16 U-Net, export). Later runs reuse it."""

from __future__ import annotations

from pathlib import Path

from segserve.contracts.repository import walk

DEFAULT_NAME = "unet-shapes"
# The CPU recipe (TrainConfig fields), sized to about 9.5 minutes on 2 cores with bf16 (measured:
# docs/benchmarks.md). Median frequency balancing: thin and small classes (bars, rings,
# stars) weigh as much as the background, which is what mean IU rewards; without it they
# stayed near 0 IU in the budget.
RECIPE = dict(
    model="unet", width=16, batch_norm=True, optimizer="adamw", lr=0.003, weight_decay=1e-4,
    epochs=50, batch_size=16, crop_size=96, scale=(0.75, 1.25), class_weighting="median",
    workers=1,
)  # fmt: skip
SYNTH_COUNT = 600  # images of synth.DEFAULT_MODEL_SET (480 train, 120 val)


def repository_has_models(repository: Path) -> bool:
    return next(walk(repository), None) is not None


def bootstrap(repository: Path, work: Path) -> Path | None:
    """Build the default model if `repository` has no model; returns its folder or None."""
    if repository_has_models(repository):
        print(f"{repository} already holds a model; nothing to build")
        return None
    from segserve.export.onnx_export import export_checkpoint
    from segserve.training.synth import DEFAULT_MODEL_SET, SynthConfig, write_dataset
    from segserve.training.train import TrainConfig, train

    data, run = work / "data" / "synth", work / "runs" / DEFAULT_NAME
    if not (data / "classes.json").exists():
        print(f"[1/3] synthetic data set -> {data}")
        write_dataset(data, SynthConfig(count=SYNTH_COUNT, seed=0, **DEFAULT_MODEL_SET))
    if not (run / "best.pt").exists() or not _finished(run):
        print(f"[2/3] training the default U-Net -> {run}")
        train(TrainConfig(data=data, out=run, resume=(run / "last.pt").exists(), **RECIPE))
    print(f"[3/3] exporting -> {repository / DEFAULT_NAME}")
    result = export_checkpoint(run / "best.pt", repository, DEFAULT_NAME)
    print(f"default model ready: {result.path} (val mean IU {result.card.metrics['mean_iu']:.4f})")
    return result.path.parent


def _finished(run: Path) -> bool:
    metrics = run / "metrics.csv"
    return (
        metrics.exists() and len(metrics.read_text().strip().splitlines()) - 1 >= RECIPE["epochs"]
    )
