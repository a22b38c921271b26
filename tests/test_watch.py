"""Model control without restarts: the server follows its repository while traffic runs."""

from __future__ import annotations

import asyncio
import shutil
import threading

from prometheus_client.parser import text_string_to_metric_families

from helpers import image_bytes, in_process, wait_for

PNG = {"Content-Type": "image/png"}


def wait_until(condition, seconds: float = 30) -> None:
    wait_for(condition, seconds, "the server following the repository", interval=0.05)


def failures(app) -> dict[tuple[str, str], float]:
    text = app.get("/metrics").text
    return {
        (s.labels["model"], s.labels["version"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "segserve_model_load_failures"
    }


def test_new_versions_take_over_and_removed_ones_leave_without_a_failed_request(
    tiny_repository, tmp_path
):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    with in_process(repo, repository_poll_s=0.1) as app:
        statuses: list[int] = []
        versions: list[str] = []
        stop = threading.Event()

        def traffic():
            async def one():
                return await app.client.post("/segment", content=image_bytes(32, 32), headers=PNG)

            while not stop.is_set():
                r = asyncio.run_coroutine_threadsafe(one(), app.loop).result(60)
                statuses.append(r.status_code)
                versions.append(r.headers.get("x-model-version", "?"))

        workers = [threading.Thread(target=traffic) for _ in range(3)]
        for w in workers:
            w.start()
        try:
            # A new version, copied in whole (as export does: a finished folder, renamed).
            staging = repo / ".staging"
            shutil.copytree(repo / "tiny" / "2", staging)
            staging.rename(repo / "tiny" / "3")
            wait_until(lambda: versions and versions[-1] == "3")
            assert app.get("/models/tiny").json()["versions"] == [1, 2, 3]
            # A removed version stops serving; the others go on.
            shutil.rmtree(repo / "tiny" / "1")
            wait_until(lambda: app.get("/models/tiny").json()["versions"] == [2, 3])
            assert (
                app.post(
                    "/segment", params={"version": 1}, content=image_bytes(8, 8), headers=PNG
                ).status_code
                == 404
            )
            # A broken new version leaves the newest good one serving, and says so.
            (repo / "tiny" / "4").mkdir()
            (repo / "tiny" / "4" / "model.onnx").write_bytes(b"half a model")
            wait_until(lambda: any(f["version"] == 4 for f in app.get("/models").json()["failed"]))
            n = len(versions)
            wait_until(lambda: len(versions) > n + 5)
            assert set(versions[n:]) == {"3"}
            assert failures(app)[("tiny", "4")] == 1.0
            assert app.get("/readyz").status_code == 200
            # Fixed in place (a new file): tried again, and it takes over.
            shutil.copy(repo / "tiny" / "2" / "model.onnx", repo / "tiny" / "4" / "model.onnx")
            wait_until(lambda: versions and versions[-1] == "4")
            assert app.get("/models").json()["failed"] == [] and failures(app)[("tiny", "4")] == 0.0
        finally:
            stop.set()
            for w in workers:
                w.join(60)
        assert statuses and set(statuses) == {200}, [s for s in statuses if s != 200]
