"""Multi-device serving: `python -m runtime.serve --tp 2` under torchrun, two CPU ranks (gloo) on 127.0.0.1.

Rank 0 serves HTTP and schedules, rank 1 replays its steps. Greedy outputs (and prefix-cache hits) equal the
single-device engine's; bad requests still get their 4xx; SIGTERM to rank 0 stops both ranks with status 0;
a rank killed mid-request gives that request a 503 and rank 0 exits with one line, within the timeout.
One torchrun launch for the module, one direct two-rank launch for the lost rank.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest

from runtime.serve.engine import Engine, GenParams, Sequence, serving_runtime
from tests.serve_helpers import Collect, free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"
MAX_TOKENS = 6


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _prompt(i: int, n: int) -> list[int]:
    return [0] + [2 + (i * 37 + j * 11) % 250 for j in range(n)]


SHARED = _prompt(7, 200)
PROMPTS = [_prompt(i, 12 + 5 * i) for i in range(4)] + [SHARED + [5, 6], SHARED[:150] + [9, 9, 9]]


def _server_args(ckpt, port: int, *extra: str) -> list[str]:
    return ["-m", "runtime.serve", "--checkpoint", str(ckpt), "--model-name", MODEL, "--port", str(port),
            "--threads", "1", "--tp", "2", *extra]


def _wait_healthy(url: str, proc, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "".join(x or "" for x in proc.communicate())[-3000:]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the two-rank server did not come up")


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(e for e in env if e.startswith(b"RANK="))[5:])


@pytest.fixture(scope="module")
def tp_server(tiny_ckpt):
    port = free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.Popen(launch + _server_args(tiny_ckpt, port), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def single_device(tiny_rt):
    """The same requests on one device through the same engine: tokens and chosen-token logprobs."""
    Out = Collect

    eng = Engine(serving_runtime(tiny_rt)).start()
    try:
        res = []
        for p in PROMPTS:
            o = Out()
            eng.submit(Sequence(p, GenParams(max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True), o))
            assert o.done.wait(120)
            res.append((tiny_rt.tokenizer.decode(o.toks), o.lps))
        return res
    finally:
        eng.stop()


def _complete(url: str, prompt: list[int]) -> dict:
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_equals_single_device_and_cache_hits(tp_server, single_device):
    url, _ = tp_server
    with ThreadPoolExecutor(4) as pool:                     # the short prompts batched together
        got = list(pool.map(lambda p: _complete(url, p), PROMPTS[:4]))
    got += [_complete(url, p) for p in PROMPTS[4:]]         # the second shares 128 cached tokens with the first
    for r, (text, lps) in zip(got, single_device):
        ch = r["choices"][0]
        assert ch["text"] == text and ch["finish_reason"] == "length"
        # TP sums partial head outputs across ranks: the same tokens, logprobs equal to float rounding
        assert ch["logprobs"]["token_logprobs"] == pytest.approx(lps, abs=1e-4)
    assert got[5]["usage"]["prompt_tokens_details"]["cached_tokens"] == 128
    assert got[4]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_bad_requests_get_their_4xx(tp_server):
    url, _ = tp_server
    base = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    cases = [({**base, "model": "nope"}, 404), ({**base, "temperature": 5}, 400),
             ({**base, "prompt": [0, 99999]}, 400), ({**base, "max_tokens": 10 ** 7}, 413)]
    for body, status in cases:
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == status, (body, r.text)
        assert "error" in r.json()
    assert httpx.get(url + "/health").status_code == 200


def test_sigterm_to_rank_0_stops_every_rank_cleanly(tp_server):
    url, proc = tp_server
    ranks = {_rank_of(c): c for c in _children(proc.pid)}
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[0], signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-3000:]                # torchrun: every rank exited with status 0
    assert "Traceback" not in out and "error" not in out, out[-3000:]


def test_lost_rank_is_a_clear_error_not_a_hang(tiny_ckpt, tmp_path):
    """Ranks started directly (the environment torchrun sets), so that nothing but the server reacts."""
    profile = tmp_path / "cpu-short-timeout.yaml"
    profile.write_text((ROOT / "hardware_profiles" / "cpu.yaml").read_text() + "collective_timeout_s: 30\n")
    port, master = free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, *_server_args(tiny_ckpt, port, "--profile", str(profile))], cwd=ROOT,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(master)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, procs[0])
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(httpx.post, url + "/v1/completions", timeout=60, json={
                "model": MODEL, "prompt": "hi", "max_tokens": 100000, "temperature": 0, "ignore_eos": True})
            deadline = time.time() + 60
            while "dsv4:generation_tokens_total 0.0" in httpx.get(url + "/metrics").text:
                assert time.time() < deadline
                time.sleep(0.05)
            procs[1].kill()                                  # rank 1 dies mid-request
            r = fut.result(timeout=60)
        # The error names the collective that failed and that a peer stopped, then gloo's own words (a killed rank
        # closes its sockets, so gloo reports that at once: seen 2026-12-03 "Connection closed by peer" or "Read
        # error ...: Connection reset by peer"; their text is gloo's, not matched). Hangs fail on the result and
        # communicate timeouts (60 s, under the 300 s default collective timeout): nothing is timed.
        # (The collective is whichever one the step was in when the peer died: tp / embedding all_reduce, the serve
        # command broadcast, ...)
        lost = r"rank 0: collective [\w -]+ failed after a peer rank stopped or hung \(."
        assert r.status_code == 503 and re.search(lost, r.json()["error"]["message"]), r.text
        _, err = procs[0].communicate(timeout=60)
        assert procs[0].returncode == 1, err
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("dsv4-serve: ready")]
        assert len(lines) == 1 and re.match(f"dsv4-serve: error: {lost}", lines[0]), err
        assert lines[0].endswith("; check the other ranks' output, then relaunch"), err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
