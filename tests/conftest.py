"""Shared fixtures: one generated tiny checkpoint per test session, runtimes loaded from it, and the session's
ONNX exports, made in a background process while the rest of the suite runs (tests/onnx_builds.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from runtime.api import Runtime
from runtime.checkpoint import make_preset

ROOT = Path(__file__).resolve().parent.parent
_BUILDS = pytest.StashKey["OnnxBuilds"]()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return make_preset(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_rt(tiny_ckpt):
    return Runtime.load("cpu", checkpoint=tiny_ckpt, progress=False)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (many small kernels run faster so on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


class OnnxBuilds:
    """`python -m tests.onnx_builds ROOT` running in the background; `get(name)` waits for one of its exports."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="dsv4rt-onnx-builds-"))
        self.log = self.root / "build.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.onnx_builds", str(self.root)], cwd=ROOT,
                                         stdout=log, stderr=subprocess.STDOUT)

    def get(self, name: str, timeout: float = 1800) -> Path:
        """ROOT/<name> once its export has finished; a failed export fails the test with the build's log."""
        deadline = time.monotonic() + timeout
        while not (self.root / f"{name}.ok").exists():
            if self.proc.poll() is not None and not (self.root / f"{name}.ok").exists():
                tail = self.log.read_text(errors="replace")[-4000:]
                pytest.fail(f"the background ONNX export {name!r} failed (exit {self.proc.returncode}):\n{tail}")
            if time.monotonic() > deadline:
                pytest.fail(f"the background ONNX export {name!r} did not finish in {timeout:.0f} s")
            time.sleep(0.2)
        return self.root / name

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def pytest_collection_modifyitems(session, config, items):
    """Tests that use the ONNX exports run last, and the exports start now, in a background process."""
    uses = [it for it in items if "onnx_builds" in getattr(it, "fixturenames", ())]
    if uses:
        later = set(uses)
        items[:] = [it for it in items if it not in later] + uses
        if not config.option.collectonly:
            config.stash[_BUILDS] = OnnxBuilds()


def pytest_unconfigure(config):
    builds = config.stash.get(_BUILDS, None)
    if builds is not None:
        builds.close()


@pytest.fixture(scope="session")
def onnx_builds(request, tiny_ckpt):
    """The background exports, made from a tiny checkpoint with the same preset and seed as tiny_ckpt: the
    fingerprints must match, so the exported graphs carry exactly the weights tiny_rt computes with."""
    from runtime.parity.report import checkpoint_fingerprint

    builds = request.config.stash.get(_BUILDS, None)
    if builds is None:                        # e.g. selected by a plugin after collection: start them now
        builds = request.config.stash[_BUILDS] = OnnxBuilds()
    assert checkpoint_fingerprint(builds.get("tiny")) == checkpoint_fingerprint(tiny_ckpt)
    return builds
