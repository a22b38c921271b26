"""`segserve batch` (segserve/batch): INPUT as a folder, a glob or a manifest, local or at an
fsspec URL; one output per input at its relative path, byte for byte what `segserve predict`
writes; a Parquet manifest with a row per input; a bad image an error row and the exit code
by the error rate; a rerun that skips what is done and a folder another model wrote refused;
and once on a real Ray cluster (a local one, started by the job). The SIGKILL-and-rerun and
the node-removed runs are in tests/test_batch_cluster.py (make test-batch)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import ROOT
from segserve.batch.inputs import InputError, list_inputs
from segserve.batch.manifest import COLUMNS, MANIFEST, Manifest, sweep_temporaries
from segserve.cli import main
from segserve.default_model import NAME, install
from segserve.service.predict import predict_files
from segserve.service.settings import Settings
from segserve.training.synth import DEFAULT_MODEL_SET, SynthConfig, render_sample


def jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("batch") / "repo"
    install(repo)
    return repo / NAME / "1" / "model.onnx"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Eight samples in a folder and a subfolder, one of them 1000x860 (above the CPU batch
    bound of 0.8 MP: it runs in tiles), and a file that is no image."""
    root = tmp_path_factory.mktemp("photos")
    config = SynthConfig(count=100, seed=11, **DEFAULT_MODEL_SET)
    for i in range(7):
        image, _ = render_sample(config, i)
        folder = root / ("sub" if i % 3 == 0 else "")
        folder.mkdir(exist_ok=True)
        image.save(folder / f"p{i}.jpg", quality=92)
    big = np.asarray(render_sample(config, 7)[0].resize((1000, 860)))
    (root / "large.jpg").write_bytes(jpeg(big))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def batch(*args: str) -> int:
    return main(["batch", *args, "--no-progress"])


def manifest_rows(out: Path) -> dict[str, dict]:
    table = pq.read_table(out / MANIFEST)
    assert table.column_names == list(COLUMNS)
    rows = table.to_pylist()
    assert len({r["id"] for r in rows}) == len(rows)  # one row per input
    return {r["id"]: r for r in rows}


def test_inputs_come_from_a_folder_a_glob_or_a_manifest_with_ids_relative_to_their_root(
    photos, tmp_path
):
    folder = list_inputs(str(photos))
    assert [i.id for i in folder] == [
        "broken.png", "large.jpg", "p1.jpg", "p2.jpg", "p4.jpg", "p5.jpg",
        "sub/p0.jpg", "sub/p3.jpg", "sub/p6.jpg",
    ]  # fmt: skip
    assert folder[6].output == "sub/p0.png" and folder[6].url == str(photos / "sub" / "p0.jpg")
    assert list_inputs(str(photos), "overlay")[1].output == "large_overlay.png"
    globbed = list_inputs(f"{photos}/**/p*.jpg")
    assert [i.id for i in globbed] == [i.id for i in folder if "/p" in f"/{i.id}"]
    data = tmp_path / "data"
    shutil.copytree(photos, data)
    (data / "list.csv").write_text("path\nsub/p0.jpg\np1.jpg\n")  # relative to the manifest
    from_csv = list_inputs(str(data / "list.csv"))
    assert [(i.id, i.url) for i in from_csv] == [
        ("p1.jpg", str(data / "p1.jpg")), ("sub/p0.jpg", str(data / "sub" / "p0.jpg")),
    ]  # fmt: skip
    import pyarrow as pa

    pq.write_table(pa.table({"path": [str(photos / "p2.jpg"), str(photos / "sub" / "p3.jpg")]}),
                   tmp_path / "list.parquet")  # fmt: skip
    assert [i.id for i in list_inputs(str(tmp_path / "list.parquet"))] == ["p2.jpg", "sub/p3.jpg"]


def test_inputs_that_would_share_an_output_or_that_do_not_exist_are_refused(photos, tmp_path):
    clash = tmp_path / "clash"
    clash.mkdir()
    shutil.copy(photos / "p1.jpg", clash / "a.jpg")
    Image.open(photos / "p1.jpg").save(clash / "a.png")
    with pytest.raises(InputError, match="a.jpg and a.png would both be written to a.png"):
        list_inputs(str(clash))
    with pytest.raises(InputError, match="no such folder"):
        list_inputs(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        list_inputs(str(tmp_path / "empty"))


def test_an_fsspec_url_is_read_as_a_folder_is(photos, shipped, local_job, tmp_path):
    """fsspec's in-memory filesystem stands in for object stores (s3://, gs://): same
    listing, same reading."""
    import fsspec

    memory = fsspec.filesystem("memory")
    for name in ("p1.jpg", "p2.jpg"):
        memory.pipe(f"/segserve-test/{name}", (photos / name).read_bytes())
    assert batch("memory://segserve-test", "--model", str(shipped), "--out", str(tmp_path),
                 "--engine", "local") == 0  # fmt: skip
    rows = manifest_rows(tmp_path)
    assert set(rows) == {"p1.jpg", "p2.jpg"} and rows["p1.jpg"]["input"].startswith("memory://")
    assert (tmp_path / "p1.png").read_bytes() == (local_job[1] / "p1.png").read_bytes()


@pytest.fixture(scope="module")
def local_job(photos, shipped, tmp_path_factory):
    """The photos through the in-process engine: the exit code, the output folder."""
    out = tmp_path_factory.mktemp("local-out")
    code = batch(str(photos), "--model", str(shipped), "--out", str(out), "--engine", "local")
    return code, out


def test_each_input_gets_the_bytes_segserve_predict_writes_and_one_manifest_row(
    local_job, photos, shipped, tmp_path
):
    code, out = local_job
    rows = manifest_rows(out)
    assert set(rows) == {i.id for i in list_inputs(str(photos))}
    for rel in ("sub/p3.jpg", "large.jpg"):
        (expected,) = predict_files([photos / rel], shipped, tmp_path / rel, "png", Settings())
        written = out / Path(rel).with_suffix(".png")
        assert written.read_bytes() == expected.read_bytes(), rel
        row = rows[rel]
        w, h = Image.open(photos / rel).size
        assert (row["status"], row["width"], row["height"]) == ("ok", w, h)
        assert row["model"] == NAME and row["version"] == 1 and row["variant"] == "float32"
        assert row["output"] == str(Path(rel).with_suffix(".png")) and row["ms"] > 0
    assert rows["large.jpg"]["width"] == 1000  # tiled (tile 320 in the tests), whole answer
    assert not list(out.rglob(".*"))  # no temporary file, no manifest part left


def test_a_bad_image_is_an_error_row_and_the_error_rate_decides_the_exit_code(local_job, photos):
    code, out = local_job
    broken = manifest_rows(out)["broken.png"]
    assert broken["status"] == "error" and "ImageDecodeError" in broken["error"]
    assert broken["width"] is None and not (out / "broken.png").exists()
    assert code == 2  # 1 of 9 failed, over the default 1 %
    assert batch(str(photos), "--model", "x", "--out", str(out)) == 1  # no such model


def test_a_rerun_skips_what_is_done_retries_errors_and_another_model_needs_overwrite(
    local_job, photos, shipped, tmp_path, capsys
):
    _, first = local_job
    out = tmp_path / "out"
    shutil.copytree(first, out)
    (out / "sub" / ".p0.png.tmp-abc").write_bytes(b"half")  # left by a killed worker
    (out / "p1.png").unlink()  # an output gone: made again
    capsys.readouterr()
    assert batch(str(photos), "--model", str(shipped), "--out", str(out), "--engine", "local",
                 "--max-error-rate", "0.2") == 0  # fmt: skip
    assert "2 images in" in capsys.readouterr().out  # p1 and the broken one, again
    assert not (out / "sub" / ".p0.png.tmp-abc").exists()
    assert len(manifest_rows(out)) == 9
    other = tmp_path / "other.onnx"
    other.write_bytes(shipped.read_bytes() + b" ")  # another file: another fingerprint
    assert batch(str(photos), "--model", str(other), "--out", str(out)) == 1
    assert "holds outputs of another model" in capsys.readouterr().err


def test_a_killed_job_s_manifest_parts_are_kept_and_folded_into_one_row_per_input(tmp_path):
    """What a rerun relies on: parts written whole survive a dead job, a later part's row
    for an input wins, and the temporaries a dead worker left are swept."""
    manifest = Manifest(tmp_path)
    row = {c: None for c in COLUMNS} | {"id": "a", "status": "error", "model_sha256": "x"}
    manifest.append([row, {**row, "id": "b", "status": "ok"}])
    manifest.append([{**row, "status": "ok"}])
    (tmp_path / ".x.png.tmp-1").write_bytes(b"")
    assert sweep_temporaries(tmp_path) == 1
    assert {k: r["status"] for k, r in Manifest(tmp_path).read().items()} == {"a": "ok", "b": "ok"}
    assert len(manifest.consolidate()) == 2 and not (tmp_path / ".manifest").exists()


def test_on_a_real_ray_cluster_the_outputs_are_the_local_engine_s(local_job, photos, shipped):
    """The job starts a local Ray (two CPUs: one actor of 1.5 of them, a half left for Ray
    Data's own tasks) and its actors read, segment and write the images themselves."""
    _, local = local_job
    out = local.parent / "ray-out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray
    done = subprocess.run(
        [sys.executable, "-m", "segserve.cli", "batch", str(photos / "sub"), "--model",
         str(shipped), "--out", str(out), "--engine", "ray", "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 images in" in done.stdout and "ray" in done.stdout
    rows = manifest_rows(out)
    assert sorted(rows) == ["p0.jpg", "p3.jpg", "p6.jpg"]
    assert {r["status"] for r in rows.values()} == {"ok"}
    for name in ("p0", "p3", "p6"):
        ray_made = (out / f"{name}.png").read_bytes()
        assert ray_made == (local / "sub" / f"{name}.png").read_bytes(), name
