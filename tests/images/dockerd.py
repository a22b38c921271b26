"""A private Docker engine for `make test-images`, and the offline base image.

Needs root (it starts dockerd) and Debian's docker.io and debootstrap packages (installed here
when missing). The engine keeps its layers under .bench/docker-root between runs; the base
image (Debian bookworm with Python 3.11, by debootstrap, no registry needed) is built once
into .bench/. The Dockerfiles' default BASE stays the public image a user would pull.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".bench"
BASE_TAG = "segserve-base:bookworm"
MIRROR = "http://deb.debian.org/debian"
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, text=True, capture_output=True, **kw)


def ensure_packages() -> None:
    missing = [
        pkg
        for pkg, binary in (("docker.io", "dockerd"), ("debootstrap", "debootstrap"))
        if shutil.which(binary) is None
    ]
    if missing:
        run(["apt-get", "update", "-qq"])
        run(
            ["apt-get", "install", "-y", "-qq", *missing],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )


class Docker:
    def __init__(self, socket: Path) -> None:
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{socket}", "DOCKER_BUILDKIT": "0"}

    def __call__(
        self, *args, check: bool = True, timeout: float = 1800
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["docker", *map(str, args)],
            env=self.env,
            text=True,
            capture_output=True,
            check=check,
            timeout=timeout,
        )


def build(docker: Docker, base: str, dockerfile: str, tag: str, extras: str | None = None) -> dict:
    """Build and describe an image: its tag, size and build time. `extras`: the EXTRAS
    build argument (the Dockerfile's default without it)."""
    t0 = time.monotonic()
    args = ["--build-arg", f"EXTRAS={extras}"] if extras else []
    result = docker(
        "build",
        "--network=host",
        "-f",
        dockerfile,
        "--build-arg",
        f"BASE={base}",
        *args,
        "-t",
        tag,
        str(ROOT),
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    size = int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout.strip())
    return {"tag": tag, "bytes": size, "build_s": time.monotonic() - t0}
