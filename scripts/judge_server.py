#!/usr/bin/env python
"""A minimal OpenAI-compatible chat server over a local Hugging Face model (default: the
embedded SmolLM2), for trying `sae-harness interp --judge` offline and for its test.

    .venv/bin/python scripts/judge_server.py [--port 0] [--model FOLDER] [--key KEY]

Serves POST /v1/chat/completions (greedy, the model's chat template, at most 32 new tokens)
and GET /stats (requests answered, and the last request body, for tests). Prints
`listening on http://127.0.0.1:PORT/v1` once ready. With --key, requests must carry
`Authorization: Bearer KEY`. A 135M model is no judge of explanations: this exists to check the
protocol, caching and arithmetic, not the quality of the answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--model", default=None, help="Hugging Face folder (default: the embedded model)")
    p.add_argument("--key", default=None)
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model is None:
        from harness.model.loading import embedded_checkpoint

        args.model = str(embedded_checkpoint())
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    lock = threading.Lock()
    stats = {"requests": 0, "last": None}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _send(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/stats":
                return self._send(200, stats)
            self._send(404, {"error": {"message": "not found"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {"error": {"message": "not found"}})
            if args.key and self.headers.get("Authorization") != f"Bearer {args.key}":
                return self._send(401, {"error": {"message": "bad key"}})
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
            with lock, torch.no_grad():
                out = model.generate(ids, max_new_tokens=min(int(body.get("max_tokens", 32)), 32), do_sample=False,
                                     pad_token_id=tok.eos_token_id)
                stats["requests"] += 1
                stats["last"] = {"body": body, "authorization": self.headers.get("Authorization")}
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            self._send(200, {"id": f"chatcmpl-{stats['requests']}", "object": "chat.completion",
                             "model": body.get("model"),
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": int(ids.shape[1]),
                                       "completion_tokens": int(out.shape[1] - ids.shape[1])}})

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
