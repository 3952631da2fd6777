"""`iva_jax.serve`: OpenAI-style /v1/completions over real HTTP (urllib) against a tiny model: greedy text
equals `generate` alone, streaming (SSE) equals non-streaming, concurrent requests, stop strings,
bad requests, and every page back in the pool afterwards."""

import json
import re
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from iva_jax.inference import generate
from iva_jax.serve import ByteTokenizer, CompletionServer
from inference_tiny import tiny_model

TOK = ByteTokenizer()  # the tiny model's 89 ids are the bytes 0..88: prompts of capitals, digits, spaces


@pytest.fixture(scope="module")
def server():
    model, params = tiny_model(std=0.1)
    srv = CompletionServer(model, params, TOK, model_name="tiny", port=0, max_batch=3, max_seq_len=64,
                           page_size=4, prefill_bucket=16, eos_token_id=[]).start()
    yield srv, model, params
    srv.stop()


def post(srv, body, stream=False):
    host, port = srv.address
    req = urllib.request.Request(f"http://{host}:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        if not stream:
            return json.loads(r.read())
        assert r.headers["Content-Type"] == "text/event-stream"
        events = [line[len("data: "):] for line in r.read().decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


PROMPTS = ["HELLO 42", "ABC DEFG", "THE FOX ", "7 8 9 10", "JAX JAX ", "PAGED KV"]


@pytest.fixture(scope="module")
def alone(server):
    """Each prompt's 12 greedy tokens generated on its own (equal lengths: one batched `generate` call)."""
    _, model, params = server
    ids = np.asarray([TOK.encode(p) for p in PROMPTS])
    return {p: TOK.decode(list(t)) for p, t in zip(PROMPTS, np.asarray(generate(model, params, ids, 12,
                                                                                  eos_token_id=[])))}


def test_completion_equals_generate_and_stream_equals_plain(server, alone):
    srv = server[0]
    exp = alone["HELLO 42"]
    r = post(srv, {"model": "tiny", "prompt": "HELLO 42", "max_tokens": 12, "temperature": 0})
    assert r["object"] == "text_completion" and r["model"] == "tiny"
    assert r["choices"][0]["text"] == exp and r["choices"][0]["finish_reason"] == "length"
    assert r["usage"] == {"prompt_tokens": 8, "completion_tokens": 12, "total_tokens": 20}
    chunks = post(srv, {"prompt": "HELLO 42", "max_tokens": 12, "stream": True}, stream=True)
    assert len(chunks) > 2 and all(c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == exp
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_concurrent_requests_and_stop_strings(server, alone):
    srv = server[0]
    prompts = PROMPTS[1:]
    results = {}

    def worker(p):
        results[p] = post(srv, {"prompt": p, "max_tokens": 10})["choices"][0]["text"]
    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]  # 5 requests, 3 slots
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in prompts:
        assert results[p] == alone[p][:10], p
    full = results["THE FOX "]
    stop = full[3:5]
    cut = full.index(stop)
    r = post(srv, {"prompt": "THE FOX ", "max_tokens": 10, "stop": [stop, "\x7f"]})
    assert r["choices"][0] == {"text": full[:cut], "index": 0, "logprobs": None, "finish_reason": "stop"}
    b = srv.batcher
    for _ in range(100):  # the cancel reaches the engine thread asynchronously
        if b.idle and b.alloc.num_free == b.alloc.num_pages:
            break
        time.sleep(0.05)
    assert b.idle and b.alloc.num_free == b.alloc.num_pages  # finished and cancelled requests returned their pages


def test_bad_requests_and_routes(server):
    srv = server[0]
    host, port = srv.address
    for body, match in (({"prompt": "ABC", "max_tokens": 0}, "max_tokens"), ({"max_tokens": 3}, "prompt"),
                        ({"prompt": "ABC", "n": 2}, "n=2"), ({"prompt": "abc"}, "ids in \\[0, 89\\)"),
                        ({"prompt": "ABC", "max_tokens": 500}, "max_seq_len")):
        with pytest.raises(urllib.error.HTTPError) as e:
            post(srv, body)
        assert e.value.code == 400
        msg = json.loads(e.value.read())["error"]["message"]
        assert re.search(match, msg), msg
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{host}:{port}/v2/nothing", timeout=10)
    assert e.value.code == 404
    with urllib.request.urlopen(f"http://{host}:{port}/v1/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny"
