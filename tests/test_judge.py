"""The LLM judge (harness/evals/judge.py) against a real local server process (scripts/judge_server.py
serving the embedded model): the protocol, the on-disk cache, the scoring arithmetic, and bad
input. A 135M model is no judge of explanations; the quality of its answers is not tested."""

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.evals import interp
from harness.evals import judge
from harness.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _start(args, tmp_path):
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=tmp_path)
    return proc


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = _start([str(ROOT / "scripts" / "judge_server.py"), "--port", "0", "--key", "sekrit"],
                  tmp_path_factory.mktemp("srv"))
    line = proc.stdout.readline().strip()
    assert line.startswith("listening on "), line
    yield line.removeprefix("listening on ")
    proc.kill()
    proc.wait()


def _stats(url):
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats") as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def records(tiny_hf_dir):
    import sys as _sys

    _sys.path.insert(0, str(ROOT / "tests"))
    from test_interp import DEEP, _relu_sae

    from harness.text import sources
    from harness.splice.session import prepare

    session = prepare(str(tiny_hf_dir), ctx=32, text=sources.TextRequest(sources.BUILTIN), eval_seqs=32)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, session.lm.d_model, generator=g)
    sae = _relu_sae(w / w.norm(dim=1, keepdim=True), torch.zeros(2), DEEP)
    return session.lm, session.tokens.numpy(), interp.collect(session.lm, sae, session.tokens, 8)


def test_judge_protocol_cache_and_scores(server, records, tmp_path, monkeypatch):
    lm, tokens, rec = records
    monkeypatch.setenv("JUDGE_TEST_KEY", "sekrit")
    cache = tmp_path / "cache"
    j = judge.Judge(server, "smollm2-judge", cache, key_env="JUDGE_TEST_KEY")
    before = _stats(server)["requests"]
    outs = [judge.score_latent(j, lm.tokenizer, tokens, rec, k, n_show=4, n_score=2) for k in (0, 1)]
    sent = _stats(server)
    assert sent["requests"] - before == j.requests == 2 * (1 + 4)  # one explanation + 4 ratings per latent
    last = sent["last"]
    assert last["authorization"] == "Bearer sekrit" and last["body"]["model"] == "smollm2-judge"
    assert last["body"]["messages"][0]["role"] == "user" and "<<" in last["body"]["messages"][0]["content"]
    assert len(list(cache.glob("*.json"))) == 10
    for o in outs:
        # the arithmetic, recomputed from the cached answers
        assert o["labels"] == [1, 1, 0, 0]
        pred = np.array([0 if r is None else r for r in o["ratings"]]) >= 5
        expect = (pred[:2].mean() + (~pred[2:]).mean()) / 2
        assert o["balanced_accuracy"] == pytest.approx(expect)
        assert isinstance(o["explanation"], str) and o["explanation"]
    # a second run is answered from the cache, identically
    again = judge.Judge(server, "smollm2-judge", cache, key_env="JUDGE_TEST_KEY")
    outs2 = [judge.score_latent(again, lm.tokenizer, tokens, rec, k, n_show=4, n_score=2) for k in (0, 1)]
    assert again.requests == 0 and _stats(server)["requests"] == sent["requests"] and outs2 == outs


def test_judge_bad_input(server, tmp_path, monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with pytest.raises(UserError, match="missing API key"):
        judge.Judge(server, "m", tmp_path, key_env="JUDGE_TEST_KEY")
    monkeypatch.setenv("JUDGE_TEST_KEY", "wrong")
    with pytest.raises(UserError, match="HTTP 401"):
        judge.Judge(server, "m", tmp_path, key_env="JUDGE_TEST_KEY").chat([{"role": "user", "content": "hi"}])
    with pytest.raises(UserError, match="does not answer"):
        judge.Judge("http://127.0.0.1:9/v1", "m", tmp_path, key_env="JUDGE_TEST_KEY").chat(
            [{"role": "user", "content": "hi"}])
    # a server that answers 200, but not as an OpenAI chat endpoint
    other = subprocess.Popen([sys.executable, "-c", OTHER_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        url = other.stdout.readline().strip()
        with pytest.raises(UserError, match="another format"):
            judge.Judge(url, "m", tmp_path, key_env="JUDGE_TEST_KEY").chat([{"role": "user", "content": "hi"}])
    finally:
        other.kill()
        other.wait()
    assert not list(tmp_path.glob("*.json"))  # nothing cached from failed requests


OTHER_SERVER = """
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"result": "not a chat completion"}'
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
s = HTTPServer(("127.0.0.1", 0), H)
print(f"http://127.0.0.1:{s.server_address[1]}/v1", flush=True)
s.serve_forever()
"""
