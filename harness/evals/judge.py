"""An LLM judge where the user has one: delphi-style explanation and detection scoring.

Any OpenAI-compatible chat endpoint works (vLLM, llama.cpp's server, a hosted API): `--judge URL`
is the API base (`http://host:port/v1`), `--judge-model` the model name, and the key is read from
an environment variable (`--judge-key-env`, default SAE_HARNESS_JUDGE_KEY; any value for a local
server that takes none). For each latent the explainer sees its strongest and some random
firing contexts (the firing token marked << >>) and contexts where it does not fire, and writes
a one-line explanation; the scorer then sees held-out contexts, half firing and half not, one at
a time, and rates 0-10 how likely the explanation says the marked token fires. Per latent:
balanced accuracy (rating >= 5 counts as "fires") and AUROC of the ratings.

Every request is cached on disk under its content hash (model, messages, max_tokens), written
atomically, so an interrupted run resumes where it stopped and a finished one re-scores for free.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from harness.errors import UserError
from harness.files import write_atomic

KEY_ENV = "SAE_HARNESS_JUDGE_KEY"
WINDOW = 16  # tokens of context shown, ending at the marked token


class Judge:
    def __init__(self, url: str, model: str, cache_dir: Path, key_env: str = KEY_ENV, timeout: float = 120):
        key = os.environ.get(key_env)
        if not key:
            raise UserError(f"missing API key for the judge: set ${key_env} (any value for a local server)")
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.key, self.timeout = model, key, timeout
        self.cache = Path(cache_dir)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.requests = 0  # sent to the server (not answered from the cache)

    def chat(self, messages: list[dict], max_tokens: int = 32) -> str:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        path = self.cache / f"{digest}.json"
        if path.is_file():
            return json.loads(path.read_text())["content"]
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.key}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise UserError(f"the judge at {self.url} answered HTTP {e.code} ({e.reason}): not an OpenAI-compatible "
                            "chat endpoint, or the model name or key is wrong") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"the judge at {self.url} does not answer ({reason})") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(f"the judge at {self.url} answered in another format (expected an OpenAI chat "
                            f"completion: choices[0].message.content); got {raw[:80]!r}") from None
        self.requests += 1
        write_atomic(path, json.dumps({"request": body, "content": content}))
        return content


def context(tokenizer, tokens: np.ndarray, index: int, window: int = WINDOW) -> str:
    """The text of the `window` tokens ending at flat position `index`, its last token marked."""
    ctx = tokens.shape[1]
    seq, pos = divmod(int(index), ctx)
    start = max(0, pos - window + 1)
    before = tokenizer.decode(tokens[seq, start:pos].tolist())
    marked = tokenizer.decode([int(tokens[seq, pos])])
    return f"{before}<<{marked}>>".replace("\n", "\\n")


def explainer_messages(firing: list[str], quiet: list[str]) -> list[dict]:
    lines = ["A feature of a language model fires on some tokens. In each snippet the token to look at is "
             "between << and >>.", "", "Snippets where the feature fires on the marked token:"]
    lines += [f"{i + 1}. {c}" for i, c in enumerate(firing)]
    lines += ["", "Snippets where it does not fire on the marked token:"]
    lines += [f"{i + 1}. {c}" for i, c in enumerate(quiet)]
    lines += ["", "In under 12 words, when does the feature fire? Reply with the explanation only."]
    return [{"role": "user", "content": "\n".join(lines)}]


def scorer_messages(explanation: str, snippet: str) -> list[dict]:
    return [{"role": "user", "content": (
        f"A feature of a language model fires when: {explanation}\n\nSnippet (the token to judge is between "
        f"<< and >>): {snippet}\n\nHow likely is it that the feature fires on the marked token? Reply with one "
        "number from 0 (surely not) to 10 (surely).")}]


def parse_rating(text: str) -> int | None:
    m = re.search(r"\b(10|[0-9])\b", text)
    return int(m.group(1)) if m else None


def detection_scores(labels: list[int], ratings: list[int | None]) -> dict:
    """Balanced accuracy (rating >= 5 = fires; an unparsed answer counts as 0) and AUROC."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, int)
    r = np.array([0 if v is None else v for v in ratings], float)
    pred = r >= 5
    tpr = float(pred[y == 1].mean()) if (y == 1).any() else float("nan")
    tnr = float((~pred[y == 0]).mean()) if (y == 0).any() else float("nan")
    auroc = float(roc_auc_score(y, r)) if len(set(y)) == 2 else float("nan")
    return {"balanced_accuracy": (tpr + tnr) / 2, "auroc": auroc, "n": int(len(y)),
            "unparsed": int(sum(v is None for v in ratings))}


def score_latent(judge: Judge, tokenizer, tokens: np.ndarray, rec, latent: int, n_show: int = 8,
                 n_score: int = 4) -> dict:
    """Explain one latent from split 0's contexts, score the explanation on split 1's."""
    top = [i for i in rec.top_index[latent] if i >= 0][:n_show // 2]
    fire0 = [i for i in rec.fire_index[0][latent] if i >= 0][:n_show - len(top)]
    quiet0 = [i for i in rec.quiet_index[0][latent] if i >= 0][:n_show // 2]
    explanation = judge.chat(explainer_messages([context(tokenizer, tokens, i) for i in top + fire0],
                                                [context(tokenizer, tokens, i) for i in quiet0]), 32).strip()
    fire1 = [i for i in rec.fire_index[1][latent] if i >= 0][:n_score]
    quiet1 = [i for i in rec.quiet_index[1][latent] if i >= 0][:n_score]
    labels = [1] * len(fire1) + [0] * len(quiet1)
    answers = [judge.chat(scorer_messages(explanation, context(tokenizer, tokens, i)), 4) for i in fire1 + quiet1]
    ratings = [parse_rating(a) for a in answers]
    return {"latent": int(latent), "explanation": explanation, "labels": labels, "ratings": ratings,
            **detection_scores(labels, ratings)}
