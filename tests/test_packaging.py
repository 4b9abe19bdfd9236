"""A regular install works: the project built as a wheel and installed into a fresh, plain virtual environment
(no system site-packages, no source tree on the path; torch installed there from the same local wheel as the
development machine's) runs the demo, `python -m runtime.run --backend cpu`, with its hardware profiles found
through the installed package. (The wheel used to ship no profiles: "unknown profile 'cpu'; shipped:" empty.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SKIP = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", ".venv",
                               ".hypothesis", "*.pyc")


def _run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_demo(tmp_path):
    # build from a copy, so the build's own folders never land in the source tree
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
          tmp_path / "wheel", src])
    wheel = next((tmp_path / "wheel").glob("dsv4rt-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.startswith("hardware_profiles/") and n.endswith(".yaml")}
    assert {f"hardware_profiles/{p.name}" for p in (ROOT / "hardware_profiles").glob("*.yaml")} \
        == shipped and "hardware_profiles/cpu.yaml" in shipped

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])                     # plain: no --system-site-packages
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    # --no-compile: pip would byte-compile torch's ~2,300 modules up front, a large part of this install on
    # two cores; what the demo imports is compiled when imported, as with any install
    _run([py, "-m", "pip", "install", "--quiet", "--no-compile", "torch==2.13.0", wheel], env=env)

    # outside the source tree: what runs is the installed package
    env = {**env, "DSV4RT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    where = _run([py, "-c", "import runtime, torch; from runtime.profile import PROFILE_DIR, shipped_profiles; "
                  "print(runtime.__file__); print(PROFILE_DIR); print(','.join(shipped_profiles()))"],
                 cwd=tmp_path, env=env).stdout.splitlines()
    assert where[0].startswith(str(venv)) and where[1].startswith(str(venv)), where
    assert set(where[2].split(",")) == {p.stem for p in (ROOT / "hardware_profiles").glob("*.yaml")}
    demo = _run([py, "-m", "runtime.run", "--backend", "cpu", "--max-new-tokens", "2"], cwd=tmp_path, env=env)
    assert demo.stdout.startswith("Hello, DeepSeek-V4!"), demo.stdout
    assert "| profile cpu | backend cpu |" in demo.stderr and "2 new tokens" in demo.stderr, demo.stderr
    # the trained default model ships in the wheel, byte for byte the recorded files
    assert "tokenizer tokenizer.json" in demo.stderr and "default_model" in demo.stderr, demo.stderr
    check = _run([py, "-c", "from runtime import default_model as d; print(d.FOLDER); print(d.verify())"],
                 cwd=tmp_path, env=env).stdout.splitlines()
    assert check[0].startswith(str(venv)) and check[1] == "[]", check
