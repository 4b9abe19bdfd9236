"""Bounded load over loopback: 32 concurrent streaming clients x 4 requests with random cancellations.

Every request that is not cancelled completes with exactly the greedy tokens the same request gets alone;
afterwards no sequence state is held (back to idle: 0 bytes) and the server is still healthy."""

from __future__ import annotations

import asyncio
import random
import time

import httpx2 as httpx
import openai
import pytest

from tests.serve_helpers import LiveServer

MODEL = "tiny"
CLIENTS, PER_CLIENT, MAX_TOKENS, DISTINCT = 32, 4, 6, 12
# Some prompts are longer than a cache block (128 tokens) and share a prefix, so the load exercises hits.
PREFIX = "You are a terse assistant. Answer in one word. " * 3
PROMPTS = [(PREFIX if i % 2 else "") + f"question {i}: what is {i} + {i * 3}?" for i in range(DISTINCT)]


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    s = LiveServer("--checkpoint", str(tiny_ckpt), "--model-name", MODEL, "--threads", "1",
                   "--max-num-seqs", "32")
    yield s
    s.close()


def _alone(server) -> list[str]:
    c = server.client()
    return [c.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                 extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]


async def _client(ac, k: int, rng: random.Random, results: list) -> None:
    for r in range(PER_CLIENT):
        i = (k * PER_CLIENT + r) % DISTINCT
        cancel_after = rng.randint(1, 3) if rng.random() < 0.25 else None
        stream = await ac.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=MAX_TOKENS,
                                             temperature=0, stream=True, extra_body={"ignore_eos": True})
        text, chunks, finish = "", 0, None
        async for ch in stream:
            chunks += 1
            if ch.choices:
                text += ch.choices[0].text
                finish = ch.choices[0].finish_reason or finish
            if cancel_after is not None and chunks >= cancel_after:
                await stream.close()                      # the client goes away mid-stream
                break
        results.append((i, text, finish, cancel_after))


def test_load_32_streaming_clients(server):
    alone = _alone(server)
    server.wait_idle()
    results: list = []
    rng = random.Random(0)

    async def main():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        await asyncio.wait_for(asyncio.gather(*[_client(ac, k, random.Random(rng.random()), results)
                                                for k in range(CLIENTS)]), timeout=240)
        await ac.close()

    t0 = time.time()
    asyncio.run(main())
    assert len(results) == CLIENTS * PER_CLIENT
    done = [(i, t, f) for i, t, f, c in results if c is None]
    assert len(done) > CLIENTS * PER_CLIENT // 2 and len(done) < len(results)    # both kinds happened
    for i, text, finish in done:
        assert finish == "length" and text == alone[i], (i, text, alone[i])
    server.wait_idle(timeout=30)                          # cancelled sequences were freed too
    assert server.S.engine.state_bytes() == 0
    assert httpx.get(server.url + "/health").status_code == 200
    assert "dsv4:num_requests_running 0.0" in httpx.get(server.url + "/metrics").text
    assert server.S.engine.cache.hits > 0
    print(f"load: {len(results)} requests in {time.time() - t0:.1f}s")
