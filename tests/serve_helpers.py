"""Test helpers: the real server (runtime.serve's app under uvicorn) on 127.0.0.1 at a free port, in a thread."""

from __future__ import annotations

import socket
import threading
import time

import httpx2 as httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m runtime.serve` in-process: same argument parsing, app and engine; uvicorn in a thread."""

    def __init__(self, *args: str):
        import runtime.serve.__main__ as serve_main

        # the model's load waits until /health was asked once (a tiny checkpoint can load before the first request,
        # and the 503-while-loading answer is what the first request checks); the module's own `load` is put back
        # as soon as the loading thread has taken the gated one
        gate, real = threading.Event(), serve_main.load

        def gated(a):
            serve_main.load = real
            assert gate.wait(60), "the first /health request never came"
            return real(a)

        serve_main.load = gated
        self.port = free_port()
        self.S, app, _ = serve_main.build(["--port", str(self.port), *args])
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.first_health = httpx.get(self.url + "/health").status_code   # while the model loads
        gate.set()
        while httpx.get(self.url + "/health").status_code != 200:
            assert time.time() < deadline, f"model did not load: {self.S.load_error}"
            time.sleep(0.1)

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "sk-test"), max_retries=0,
                             timeout=kw.pop("timeout", 120), **kw)

    def wait_idle(self, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while not self.S.engine.idle() or self.S.engine.state_bytes():
            assert time.time() < deadline, "engine did not go idle"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.S.engine.stop()


class Collect:
    """An engine sink that keeps a request's tokens and chosen-token logprobs and signals when it finished."""

    def __init__(self):
        self.toks, self.lps, self.done, self.reason = [], [], threading.Event(), None

    def token(self, t, lp):
        self.toks.append(t)
        self.lps.append(lp[0])
        return False

    def finish(self, reason):
        self.reason = reason
        self.done.set()
