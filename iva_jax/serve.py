"""OpenAI-compatible completions server on localhost (stdlib http.server), continuous batching inside.

    python -m iva_jax.serve --model smollm2-135m --port 8000 [--precision int4 --group-size 32]
    curl localhost:8000/v1/completions -d '{"prompt": "Once upon a time", "max_tokens": 32, "stream": true}'

Endpoints: POST /v1/completions (prompt: a string, or a list of token ids; max_tokens; temperature,
0 = greedy; stop: a string or a list; stream: server-sent events "data: {...}" chunks then
"data: [DONE]"), GET /v1/models, GET /health.  One request = one completion (n = 1).

One engine thread owns the model and a `ContinuousBatcher` (all JAX calls happen there); HTTP
handler threads hand it requests and read tokens from per-request queues, so requests arriving
while others are decoding join the running batch.  A stop string or a client that disconnects
cancels the request and frees its pages.  The CLI loads weights and the tokenizer through
`torch_bridge` (the torch extra); `CompletionServer` itself takes any model, params and tokenizer
(an object with `encode(text) -> ids` and `decode(ids) -> text`, e.g. `ByteTokenizer`).
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

from iva_jax.inference.continuous import ContinuousBatcher
from iva_jax.train.data import ByteTokenizer  # noqa: F401  (re-exported: the tokenizer of tiny test models)


class _Engine(threading.Thread):
    """Runs the batcher: takes submissions and cancellations, steps while there is work, routes tokens."""

    def __init__(self, batcher: ContinuousBatcher):
        super().__init__(daemon=True, name="iva-serve-engine")
        self.batcher = batcher
        self.inbox: "queue.Queue[Tuple[str, Any]]" = queue.Queue()
        self.outputs: Dict[int, queue.Queue] = {}
        self._halt = threading.Event()

    def submit(self, prompt: List[int], max_tokens: int, temperature: Optional[float]) -> "queue.Queue":
        out: queue.Queue = queue.Queue()
        self.inbox.put(("submit", (prompt, max_tokens, temperature, out)))
        return out

    def cancel(self, rid: int) -> None:
        self.inbox.put(("cancel", rid))

    def stop(self) -> None:
        self._halt.set()
        self.inbox.put(("noop", None))

    def _drain(self, block: bool) -> None:
        while True:
            try:
                kind, arg = self.inbox.get(block=block, timeout=0.1 if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "submit":
                prompt, max_tokens, temperature, out = arg
                try:
                    rid = self.batcher.submit(prompt, max_tokens, temperature=temperature)
                except ValueError as e:
                    out.put(("error", str(e)))
                    continue
                self.outputs[rid] = out
                out.put(("id", rid))
            elif kind == "cancel":
                if self.batcher.cancel(arg):
                    out = self.outputs.pop(arg, None)
                    if out is not None:
                        out.put(("done", "cancelled"))

    def run(self) -> None:
        while not self._halt.is_set():
            self._drain(block=self.batcher.idle)
            if self.batcher.idle:
                continue
            try:
                events = self.batcher.step()
            except Exception as e:  # noqa: BLE001  (report to every waiting client, keep serving)
                for out in self.outputs.values():
                    out.put(("error", f"engine failure: {type(e).__name__}: {e}"))
                self.outputs.clear()
                continue
            for rid, tok, finished in events:
                out = self.outputs.get(rid)
                if out is None:
                    continue
                out.put(("token", tok))
                if finished:
                    out.put(("done", None))
                    self.outputs.pop(rid, None)


class CompletionServer:
    """The HTTP front end: `start()` serves on (host, port) in a background thread; `stop()` ends it."""

    def __init__(self, model, params, tokenizer, *, model_name: str = "iva-jax", host: str = "127.0.0.1",
                 port: int = 8000, default_max_tokens: int = 16, **batcher_kwargs: Any):
        batcher_kwargs.setdefault("eos_token_id", getattr(tokenizer, "eos_token_id", None) or model.config.eos_token_id)
        self.batcher = ContinuousBatcher(model, params, **batcher_kwargs)
        self.engine = _Engine(self.batcher)
        self.tokenizer, self.model_name, self.default_max_tokens = tokenizer, model_name, default_max_tokens
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def address(self) -> Tuple[str, int]:
        return self.httpd.server_address[:2]

    def start(self) -> "CompletionServer":
        self.engine.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="iva-serve-http")
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.engine.stop()

    # ---- one completion ---------------------------------------------------------------------
    def parse(self, body: Dict[str, Any]) -> Tuple[List[int], int, Optional[float], List[str], bool]:
        """(prompt ids, max_tokens, temperature, stop strings, stream) from an OpenAI request body."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = prompt
        else:
            raise ValueError("prompt must be a string or a non-empty list of token ids (one prompt per request)")
        if body.get("n", 1) != 1:
            raise ValueError(f"n={body.get('n')!r}: only n=1 is supported")
        max_tokens = body.get("max_tokens", self.default_max_tokens)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        temperature = body.get("temperature")
        if temperature is not None and (not isinstance(temperature, (int, float)) or temperature < 0):
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError("stop must be a non-empty string or a list of them")
        return ids, max_tokens, temperature, stop, bool(body.get("stream", False))

    def completion(self, ids, max_tokens, temperature, stop):
        """Yield ("text", delta) pieces, then ("finish", reason, n_tokens)."""
        out = self.engine.submit(ids, max_tokens, None if temperature is None else float(temperature))
        kind, val = out.get()
        if kind == "error":
            raise ValueError(val)
        rid = val
        done = False
        try:
            yield from self._pieces(out, rid, stop)
            done = True
        finally:
            if not done:  # the client went away (or an error): free the slot and its pages
                self.engine.cancel(rid)

    def _pieces(self, out, rid, stop):
        toks: List[int] = []
        sent = ""
        reason = "length"
        while True:
            kind, val = out.get()
            if kind == "error":
                raise RuntimeError(val)
            if kind == "done":
                eos = self.batcher.default_eos
                reason = "stop" if toks and toks[-1] in eos else "length"
                if toks and toks[-1] in eos:
                    toks = toks[:-1]
                break
            toks.append(val)
            text = self.tokenizer.decode(toks)
            hit = min((text.find(s) for s in stop if s in text), default=-1)
            if hit >= 0:
                self.engine.cancel(rid)
                if hit > len(sent):
                    yield "text", text[len(sent):hit]
                yield "finish", "stop", len(toks)
                return
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                continue
            safe = len(text) - max((len(s) for s in stop), default=1) + 1  # hold back a possible stop prefix
            if safe > len(sent):
                yield "text", text[len(sent):safe]
                sent = text[:safe]
        text = self.tokenizer.decode(toks)
        if len(text) > len(sent):
            yield "text", text[len(sent):]
        yield "finish", reason, len(toks)


def _make_handler(server: CompletionServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet
            pass

        def _json(self, code: int, obj: Dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, msg: str) -> None:
            kind = "invalid_request_error" if code == 400 else "server_error"
            self._json(code, {"error": {"message": msg, "type": kind}})

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                return self._json(200, {"status": "ok"})
            if self.path == "/v1/models":
                return self._json(200, {"object": "list", "data": [
                    {"id": server.model_name, "object": "model", "owned_by": "iva-jax"}]})
            self._error(404, f"no route {self.path}")

        def do_POST(self):  # noqa: N802
            if self.path != "/v1/completions":
                return self._error(404, f"no route {self.path}")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("the request body must be a JSON object")
                ids, max_tokens, temperature, stop, stream = server.parse(body)
            except (ValueError, json.JSONDecodeError) as e:
                return self._error(400, str(e))
            cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            head = {"id": cid, "object": "text_completion", "created": created, "model": server.model_name}
            pieces = server.completion(ids, max_tokens, temperature, stop)
            if not stream:
                try:
                    parts = list(pieces)
                except ValueError as e:
                    return self._error(400, str(e))
                except RuntimeError as e:
                    return self._error(500, str(e))
                text = "".join(p[1] for p in parts if p[0] == "text")
                _, reason, n = parts[-1]
                return self._json(200, {**head, "choices": [
                    {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}})
            try:
                first = next(pieces)
            except ValueError as e:
                return self._error(400, str(e))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def send(piece) -> None:
                reason = piece[1] if piece[0] == "finish" else None
                text = piece[1] if piece[0] == "text" else ""
                chunk = {**head, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            try:
                send(first)
                for piece in pieces:
                    send(piece)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pieces.close()  # the generator's request is cancelled below
            except RuntimeError as e:
                self.wfile.write(f"data: {json.dumps({'error': {'message': str(e)}})}\n\n".encode())

    return Handler


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m iva_jax.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="HF dir, .gguf file, or smollm2-135m")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--quant-config", default=None, help="a QuantConfig YAML (e.g. configs/quant_infer.yaml)")
    ap.add_argument("--precision", default=None, choices=("bf16", "int8", "int4", "fp8"))
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--max-seq-len", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=0.0, help="default when a request gives none")
    args = ap.parse_args(argv)

    import jax.numpy as jnp

    from iva_jax import quant
    from iva_jax.inference.sampling import SamplingConfig
    from torch_bridge import load_pretrained  # the torch extra (weights and tokenizer)
    from torch_bridge.tokenizer import load_tokenizer

    qc = quant.QuantConfig.from_yaml(args.quant_config) if args.quant_config else quant.QuantConfig()
    over = {k: v for k, v in (("precision", args.precision), ("group_size", args.group_size),
                              ("max_batch", args.max_batch), ("max_seq_len", args.max_seq_len)) if v is not None}
    qc = qc.replace(**over)
    model, params = load_pretrained(args.model, dtype=getattr(jnp, args.dtype))
    model, params = quant.quantize_from_config(model, params, qc)
    tok = load_tokenizer(args.model)
    srv = CompletionServer(model, params, tok, model_name=str(args.model), host=args.host, port=args.port,
                           max_batch=qc.max_batch, max_seq_len=qc.max_seq_len, page_size=qc.page_size,
                           num_pages=qc.num_pages, kv_dtype=qc.kv_precision, n_sink=qc.n_sink, window=qc.kv_window,
                           sampling=SamplingConfig(temperature=args.temperature))
    srv.start()
    host, port = srv.address
    print(f"iva-jax serving {args.model} ({qc.precision}) on http://{host}:{port}/v1/completions", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
