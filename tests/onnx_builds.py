"""The suite's two ONNX exports of the tiny model, made in one background process; not a test module.

    python -m tests.onnx_builds ROOT

Each export takes about three minutes on two cores, nearly all of it single-threaded Python (tracing and graph
building), so tests/conftest.py starts this process as soon as the session has collected a test that uses
them, runs those tests last, and the rest of the suite runs on the other core meanwhile. The exports are the
calls tests/test_onnx_export.py used to make in-process, unchanged: `export_model(tiny, "cpu", ROOT/step/out)`
and `export_edge(tiny, ROOT/edge/edge, batch=1, seq=64, capacity=256, opset=15)`, from a tiny checkpoint made
here with the session's preset and seed (the fixtures check that its fingerprint is tiny_ckpt's). Each export
that finishes leaves ROOT/<name>.ok; a failure ends the process with its traceback in ROOT/build.log.
"""

from __future__ import annotations

import sys
from pathlib import Path

BUILDS = ("step", "edge")            # the order they are built in: the step graph serves most of the tests


def main(root: str) -> int:
    from export.edge import export_edge
    from export.onnx import export_model
    from runtime.checkpoint import make_preset

    root = Path(root)
    tiny = make_preset(root / "tiny", "tiny", seed=0)
    (root / "tiny.ok").touch()
    export_model(tiny, "cpu", root / "step" / "out", progress=False)
    (root / "step.ok").touch()
    export_edge(tiny, root / "edge" / "edge", batch=1, seq=64, capacity=256, opset=15, progress=False)
    (root / "edge.ok").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
