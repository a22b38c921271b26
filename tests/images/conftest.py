"""Fixtures of `make test-images`: a private dockerd and the offline base image (dockerd.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from dockerd import BASE_TAG, CACHE, HOST_CA_BUNDLE, MIRROR, Docker, ensure_packages, run


@pytest.fixture(scope="session")
def docker() -> Docker:
    if os.geteuid() != 0:
        pytest.skip("make test-images needs root: it starts its own dockerd")
    ensure_packages()
    tmp = Path(tempfile.mkdtemp(prefix="segserve-dockerd-"))
    socket = tmp / "docker.sock"
    log = (tmp / "dockerd.log").open("w")
    proc = subprocess.Popen(
        [
            "dockerd",
            f"--data-root={CACHE / 'docker-root'}",
            f"--exec-root={tmp / 'exec'}",
            f"--host=unix://{socket}",
            f"--pidfile={tmp / 'dockerd.pid'}",
            "--iptables=false",
            "--bridge=none",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    engine = Docker(socket)
    deadline = time.monotonic() + 60
    while engine("info", check=False).returncode != 0:
        assert proc.poll() is None and time.monotonic() < deadline, (
            tmp / "dockerd.log"
        ).read_text()[-2000:]
        time.sleep(0.5)
    try:
        yield engine
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def base_image(docker: Docker) -> str:
    """Debian bookworm with Python 3.11 and venv, made by debootstrap (cached) and imported."""
    if docker("image", "inspect", BASE_TAG, check=False).returncode == 0:
        return BASE_TAG
    tarball = CACHE / "bookworm-python.tar"
    if not tarball.exists():
        rootfs = CACHE / "rootfs"
        if not (rootfs / "usr" / "bin" / "python3").exists():
            shutil.rmtree(rootfs, ignore_errors=True)
            run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    "--include=python3,python3-venv,ca-certificates",
                    "bookworm",
                    rootfs,
                    MIRROR,
                ],
                timeout=1800,
            )
        # Trust what this machine trusts: where a proxy re-signs TLS, pip in the build
        # must accept its certificates as the host's pip does.
        shutil.copy(HOST_CA_BUNDLE, rootfs / "etc" / "ssl" / "certs" / "ca-certificates.crt")
        run(["tar", "-C", rootfs, "-cf", tarball, "."], timeout=600)
    docker(
        "import",
        "--change",
        f"ENV PIP_CERT={HOST_CA_BUNDLE}",
        "--change",
        f"ENV SSL_CERT_FILE={HOST_CA_BUNDLE}",
        tarball,
        BASE_TAG,
    )
    return BASE_TAG
