"""lm-eval backend `sae-spliced`: any lm-eval task on a model with SAEs spliced in.

One `SpliceEngine` holds the model and every variant of a comparison (clean, each SAE, joint
splices, baselines). Each variant is exposed to lm-eval as its own `SplicedLM` (a TemplateLM),
but the views share the engine: the first view to see a batch of requests runs the layers
below the first splice point once, replays the tail once per variant, and caches every
variant's answer. The other views' identical requests are then served from that cache, so a
comparison of k SAEs costs one prefix plus k+1 tails, not k+1 full evaluations.

Request handling follows lm-eval's HFLM exactly (tokenisation without added special tokens,
left truncation to max_length, right padding, lm-eval's Collator with one forward per shared
context for multiple choice), so with no SAE the log-likelihoods equal HFLM's (tested).
Only the continuation positions go through the final norm and unembedding.

Under torchrun each view answers lm-eval's multi-process protocol as HFLM does (`rank`,
`world_size`, `all_gather`, `gather_object`, `barrier`, through harness/model/distributed.py):
lm-eval gives each process every world_size-th document, pads the request counts, and
gathers samples and metrics on rank 0, which alone gets the results; the samples are put
back in document order there, so per-question rows come out as one process writes them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import hashlib
import json
import re
import sqlite3
import subprocess
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from lm_eval.models.utils_hf import pad_and_concat

from harness.model import distributed
from harness.model import logits as logit_chunks
from harness.model.loading import LoadedModel, hook_device
from harness.errors import UserError
from harness.splice.session import prepare
from harness.splice.splicer import Splicer
from harness.splice.variants import Variant, sites_of


class SpliceEngine:
    """The model, its variants, and a cache of per-variant answers keyed by request tokens."""

    def __init__(self, lm: LoadedModel, variants: list[Variant], tokenizer=None, batch_size: int = 8,
                 max_length: int | None = None, keep_first: bool = True, store: "RequestStore | None" = None,
                 logits_budget: int | None = None):
        self.lm = lm
        # bytes for the log-probs of one group of rows (all variants): rows are scored a few at a
        # time within it, so memory does not grow with batch x continuation x vocabulary
        self.logits_budget = logits_budget or logit_chunks.default_budget(lm.device)
        logit_chunks.positions_per_chunk(int(lm.model.cfg.d_vocab) * len(variants), self.logits_budget)  # refused up front
        self.store = store  # answers saved across processes (resume); None keeps them in memory only
        self.variants = variants
        self.tokenizer = tokenizer or hf_tokenizer(lm)
        self.batch_size = int(batch_size)
        self.splicer = Splicer(lm, sites_of(variants), keep_first)
        for v in variants:
            for r in v.parts.values():
                r.to(hook_device(lm, r.hook))
        self.max_length = max_length or int(getattr(lm.model.cfg, "n_ctx", 2048) or 2048)
        self.cache: dict[tuple, list[tuple[float, bool]]] = {}  # (ctx, cont) -> answer per variant
        self.generations: dict[tuple, list[str]] = {}  # (ctx, until, max) -> text per variant
        self.forward_stats = {"tokens": 0, "batches": 0, **self.splicer.block_cost(variants)}
        # Progress over the real work: (requests answered, requests seen) counted once per
        # variant, so a bar moves as batches are scored, whichever variant's view asked.
        self.on_progress: Callable[[int, int], None] | None = None
        self.done = self.expected = 0

    def _advance(self, done: int = 0, expected: int = 0) -> None:
        self.done += done
        self.expected += expected
        if self.on_progress is not None:
            self.on_progress(self.done, self.expected)

    def index(self, name: str) -> int:
        for i, v in enumerate(self.variants):
            if v.name == name:
                return i
        raise UserError(f"unknown variant {name!r}")

    @torch.no_grad()
    def score(self, requests: list[tuple[Any, list[int], list[int]]]) -> None:
        """Compute and cache every variant's (logprob, is_greedy) for uncached requests."""
        todo = [r for r in requests if (tuple(r[1]), tuple(r[2])) not in self.cache]
        if not todo:
            return

        def sort_key(req):  # longest first, as HFLM: padding is set by the first of a batch
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        # One forward per group of requests sharing context + continuation[:-1] (MC choices).
        order = Collator(todo, sort_fn=sort_key, group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
        members: dict[tuple, list] = {}  # a row's group: every request its one forward answers
        for _, ctx, cont in todo:
            members.setdefault(tuple(ctx + cont[:-1]), []).append([ctx, cont])
        answers: list[list[tuple[float, bool]]] = []
        n_var = len(self.variants)
        self._advance(expected=len(todo) * n_var)
        for chunk in order.get_batched(n=self.batch_size):
            answered = len(answers)
            # The chunks depend only on the full request list, so a resumed run meets the same
            # chunks: a saved one is read back, the others are computed exactly as before.
            key = self._chunk_key([members[tuple(ctx + cont[:-1])] for _, ctx, cont in chunk])
            saved = self.store.get(key) if self.store is not None else None
            if saved is None:
                saved = self._score_chunk(order, chunk)
                if self.store is not None:
                    self.store.put(key, saved)
            else:
                for req, ctx, cont in chunk:  # keep the Collator's bookkeeping of expanded requests
                    for _ in order.get_cache(req_str=req, cxt_toks=ctx, cont_toks=cont, logits=torch.zeros(1, 1, 1)):
                        pass
            answers.extend([tuple(a) for a in ans] for ans in saved)
            self._advance(done=(len(answers) - answered) * n_var)
        for (_, ctx, cont), ans in zip(todo, order.get_original(answers)):
            self.cache[(tuple(ctx), tuple(cont))] = ans

    def _chunk_key(self, groups: list[list]) -> str:
        what = [[v.name for v in self.variants], self.max_length, groups]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()

    def _score_chunk(self, order: Collator, chunk) -> list[list[tuple[float, bool]]]:
        """One forward (prefix once, a tail per variant) -> every variant's answer for every
        request of the chunk, including the requests its rows stand for (MC choices)."""
        inps, inplens, conts = [], [], []
        for _, ctx, cont in chunk:
            inp = torch.tensor((ctx + cont)[-(self.max_length + 1):][:-1], dtype=torch.long)
            inps.append(inp)
            inplens.append(len(inp))
            conts.append(cont)
        batch = pad_and_concat(max(inplens), inps, padding_side="right").to(self.lm.device)
        span = max(len(c) for c in conts)
        # Positions whose logits predict the continuation (the last `span` of each row).
        pos = torch.tensor([[max(n - span + j, 0) for j in range(span)] for n in inplens], device=self.lm.device)
        heads = self._continuation_heads(batch, pos)  # per variant: [B, span, d] head inputs (or logits)
        n_var, vocab = len(self.variants), int(self.lm.model.cfg.d_vocab)
        rows = max(1, self.logits_budget // (n_var * span * vocab * 4 * 2))  # log-probs + their temporary
        answers = []
        for r0 in range(0, len(chunk), rows):
            per_variant = torch.stack([F.log_softmax(self._head(h[r0:r0 + rows]).float(), dim=-1)
                                       for h in heads])  # [n_var, rows, span, V]
            for row, (req, ctx, cont) in enumerate(chunk[r0:r0 + rows]):
                # get_cache expands one row to every request of its context group; it wants a
                # [1, seq, vocab] tensor, so the variants ride along in the last dimension.
                stacked = per_variant[:, row].permute(1, 0, 2).reshape(1, span, -1)
                for _, cont_toks, lp in order.get_cache(req_str=req, cxt_toks=ctx, cont_toks=cont, logits=stacked):
                    n = len(cont_toks)
                    lp = lp.reshape(span, n_var, -1)[-n:]  # [n, n_var, V]
                    target = torch.tensor(cont_toks, device=lp.device)
                    picked = lp.gather(-1, target[:, None, None].expand(n, n_var, 1))[..., 0]
                    greedy = (lp.argmax(-1) == target[:, None]).all(0)
                    answers.append([(float(picked[:, v].sum()), bool(greedy[v])) for v in range(n_var)])
            del per_variant
        return answers

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.splicer.head(h) if self.splicer.splits_head else h

    def _continuation_heads(self, batch: torch.Tensor, pos: torch.Tensor) -> list[torch.Tensor]:
        """Per variant (self.variants order) what its logits at `pos` are made from: the head's
        inputs [batch, P, d] (`_head` finishes them a few rows at a time), or, for a model whose
        head cannot run apart, the logits [batch, P, vocab] themselves."""
        from harness.model.replay import take_positions

        self.forward_stats["batches"] += 1
        self.forward_stats["tokens"] += batch.numel()
        split = self.splicer.splits_head
        clean, spliced = None, {}
        for v, out in self.splicer.run_variants(batch, [v for v in self.variants if v.parts],
                                                positions=None if split else pos, hidden=split):
            out = take_positions(out, pos) if split else out
            if v is None:
                clean = out
            else:
                spliced[v.name] = out
        return [spliced[v.name] if v.parts else clean for v in self.variants]

    def generation(self, variant: Variant, context: list[int], until: list[str], max_gen_toks: int) -> str:
        """`generate`, saved per variant and request when the engine has a store (resume)."""
        key = "gen:" + json.dumps([variant.name, context, until, max_gen_toks])
        text = self.store.get(key) if self.store is not None else None
        if text is None:
            text = self.generate(variant, context, until, max_gen_toks)
            if self.store is not None:
                self.store.put(key, text)
        return text

    def generate(self, variant: Variant, context: list[int], until: list[str], max_gen_toks: int) -> str:
        """The variant's continuation of `context` up to a stop string, EOS or max_gen_toks.

        Every variant of the engine generates in the same batch (`harness.splice.generate`: HF
        generate with a KV cache, greedy as lm-eval's default); the others are cached for
        their own views. The context keeps its last max_length - max_gen_toks tokens, as HFLM."""
        from harness.splice.generate import generate

        context = context[-max(self.max_length - max_gen_toks, 1):]
        key = (tuple(context), tuple(until), max_gen_toks)
        if key not in self.generations:
            rows = generate(self.lm, self.variants, context, max_gen_toks, tokenizer=self.tokenizer,
                            until=until, keep_first=self.splicer.keep_first)
            eos = self.tokenizer.eos_token_id
            texts = []
            for ids in rows:
                ids = ids[:-1] if ids and ids[-1] == eos else ids
                text = self.tokenizer.decode(ids)
                for u in until:
                    text = text.split(u)[0]
                texts.append(text)
            self.generations[key] = texts
        return self.generations[key][self.index(variant.name)]


class RequestStore:
    """Scored request chunks and generations in one sqlite file (the partial run folder's
    `.resume/requests.sqlite`), committed one by one, so an interrupted task stage resumes
    where it stopped. Floats go through JSON, which writes them so they read back exactly.
    The run folder's identity check (model, SAE file hashes, variants, tasks) guards reuse."""

    def __init__(self, path):
        self.db = sqlite3.connect(str(path))
        self.db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.db.commit()

    def get(self, key: str):
        row = self.db.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (key, json.dumps(value)))
        self.db.commit()

    def close(self) -> None:
        self.db.close()


def hf_tokenizer(lm: LoadedModel):
    """The tokenizer HFLM would use: AutoTokenizer on the same checkpoint.

    TransformerBridge configures its tokenizer to prepend BOS; lm-eval's HFLM does not, and
    its numbers are the reference, so requests are tokenised with the plain HF tokenizer."""
    source = lm.load_info.get("source")
    if lm.runner.hf_model() is not None and source:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source)
    return lm.tokenizer


@functools.lru_cache(maxsize=1)
def quiet_git_hash() -> str | None:
    """What lm-eval records as `git_hash` (`git describe --always` in the working folder), asked
    once and quietly: lm-eval's own call lets git print "fatal: not a git repository" once per
    evaluation outside a checkout (once per variant here)."""
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _quiet_lm_eval_git() -> None:
    import lm_eval.evaluator
    import lm_eval.loggers.utils

    lm_eval.evaluator.get_git_commit_hash = quiet_git_hash
    lm_eval.loggers.utils.get_git_commit_hash = quiet_git_hash


def _offline_tasks_by_default() -> None:
    """lm_eval.simple_evaluate builds `TaskManager(metadata=...)` when given no task manager;
    importing this module (which registers `sae-spliced`) teaches that default the offline
    tasks in tasks/ as well, so `simple_evaluate(model="sae-spliced", ..., tasks=["arc_easy_offline"])`
    works as written. lm-eval's own tasks are unaffected."""
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager

    from harness.lmeval.mmlu import TASKS_DIR

    if getattr(lm_eval.evaluator.TaskManager, "adds_offline_tasks", False):
        return

    class WithOfflineTasks(TaskManager):
        adds_offline_tasks = True

        def __init__(self, *args, include_path=None, **kwargs):
            given = [] if include_path is None else list(include_path) if isinstance(include_path, (list, tuple)) \
                else [include_path]
            super().__init__(*args, include_path=[str(TASKS_DIR), *given], **kwargs)

    lm_eval.evaluator.TaskManager = WithOfflineTasks


_offline_tasks_by_default()


@register_model("sae-spliced")
class SplicedLM(TemplateLM):
    """One variant of a SpliceEngine as an lm-eval model.

    From lm-eval: `--model sae-spliced --model_args model=smollm2-135m,sae=l15-w2304-k32`
    (`sae=A+B` splices A and B jointly; no `sae` is the clean model)."""

    def __init__(self, model: str = "smollm2-135m", sae: str = "", batch_size: int | str = 8,
                 device: str = "cpu", dtype: str = "float32", sae_dtype: str = "float32",
                 device_map: str | None = None, max_length: int | None = None,
                 engine: SpliceEngine | None = None, variant: str | None = None, **kwargs):
        super().__init__()
        if engine is None:  # built by lm-eval from a model_args string
            session = prepare(model, [sae] if sae else [], device=device, dtype=dtype,
                              sae_dtype=sae_dtype, device_map=device_map)
            engine = SpliceEngine(session.lm, session.variants[-1:], max_length=max_length,
                                  batch_size=int(batch_size) if batch_size != "auto" else 8)
            variant = session.variants[-1].name
        self.engine = engine
        self.variant_index = engine.index(variant or engine.variants[0].name)
        self.tokenizer = engine.tokenizer

    @property
    def variant(self) -> Variant:
        return self.engine.variants[self.variant_index]

    # lm-eval's multi-process protocol (lm_eval/api/model.py; HFLM implements it with accelerate)
    @property
    def device(self):
        return self.engine.lm.device

    @property
    def rank(self) -> int:
        return distributed.rank()

    @property
    def world_size(self) -> int:
        return distributed.world_size()

    def all_gather(self, tensor):
        return distributed.all_gather_tensor(tensor)

    def gather_object(self, obj, dst=0):
        return distributed.gather_object(obj, dst)

    def barrier(self) -> None:
        distributed.barrier()

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.engine.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    @property
    def tokenizer_name(self) -> str:  # what lm-eval's request cache keys chat-templated prompts by
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """`--apply_chat_template`: the tokenizer's template, called as HFLM calls it (a template
        that refuses a system turn gets the history without it)."""
        import jinja2

        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                      continue_final_message=not add_generation_prompt)
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)
        except jinja2.exceptions.TemplateError:
            return self.tokenizer.apply_chat_template([m for m in chat_history if m["role"] != "system"], **kwargs)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        self.engine.score(requests)
        return [self.engine.cache[(tuple(c), tuple(t))][self.variant_index] for _, c, t in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in [r.args for r in requests]:
            windows = [(None,) + w for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))]
            out.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        self.engine._advance(expected=len(requests))
        for context, gen_kwargs in [r.args for r in requests]:
            until = gen_kwargs.get("until", [self.tok_decode([self.eot_token_id])])
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(gen_kwargs.get("max_gen_toks", 256))
            out.append(self.engine.generation(self.variant, self.tok_encode(context), until, max_gen))
            self.engine._advance(done=1)
        return out


def variant_views(lm: LoadedModel, variants: list[Variant], batch_size: int = 8,
                  max_length: int | None = None, keep_first: bool = True,
                  store: RequestStore | None = None, logits_budget: int | None = None) -> list[SplicedLM]:
    """One lm-eval model per variant, all sharing one engine (and so one pass)."""
    engine = SpliceEngine(lm, variants, batch_size=batch_size, max_length=max_length, keep_first=keep_first,
                          store=store, logits_budget=logits_budget)
    return [SplicedLM(engine=engine, variant=v.name) for v in variants]


@dataclass
class TaskResults:
    by_variant: dict[str, dict]  # variant name -> lm_eval.simple_evaluate's results dict
    engine_stats: dict  # tokens and batches scored, blocks run shared vs naive


def _silenced(bar):
    """tqdm with disable forced on (a caller's own disable=False must not switch it back)."""
    @functools.wraps(bar)
    def silent(*args, **kwargs):
        kwargs["disable"] = True
        return bar(*args, **kwargs)
    return silent


@contextlib.contextmanager
def quiet_lm_eval():
    """Silence lm-eval's own progress bars and info logs while it runs inside the harness.

    lm-eval draws one tqdm bar per task while building requests (57 for MMLU, again for every
    variant) and one while tokenising, and `datasets` one per document map; the harness shows
    one bar over the scored requests instead. Warnings and errors still come through."""
    import datasets
    import lm_eval.api.model
    import lm_eval.api.task

    modules = (lm_eval.api.model, lm_eval.api.task)
    saved = [m.tqdm for m in modules]
    logger = logging.getLogger("lm_eval")
    level = logger.level
    bars_were_off = datasets.is_progress_bar_enabled() is False
    for m, bar in zip(modules, saved):
        m.tqdm = _silenced(bar)
    logger.setLevel(logging.WARNING)
    datasets.disable_progress_bars()  # the `Map` bars of a task's process_docs
    try:
        yield
    finally:
        for m, bar in zip(modules, saved):
            m.tqdm = bar
        logger.setLevel(level)
        if not bars_were_off:
            datasets.enable_progress_bars()


class TasksLoadedOnce:
    """A TaskManager that builds each set of tasks once.

    simple_evaluate builds its Task objects (reading and processing every document: HellaSwag's
    process_docs maps all 10,042) on every call, and the harness calls it once per variant.
    Reusing them is safe: each call rebuilds the requests (`build_all_requests`) and resets the
    few-shot seed, so every variant sees the same prompts as a fresh Task would give."""

    def __init__(self, task_manager):
        self._task_manager = task_manager
        self._loaded: dict[str, dict] = {}

    def load(self, tasks):
        key = json.dumps(tasks, sort_keys=True, default=str)
        if key not in self._loaded:
            self._loaded[key] = self._task_manager.load(tasks)
        return self._loaded[key]

    def __getattr__(self, name):
        return getattr(self._task_manager, name)


def evaluate_tasks(lm: LoadedModel, variants: list[Variant], tasks: list[str], task_manager=None,
                   batch_size: int = 8, max_length: int | None = None, progress=None,
                   keep_first: bool = True, request_store: str | None = None, logits_budget: int | None = None,
                   **lm_eval_kwargs) -> TaskResults:
    """`lm_eval.simple_evaluate` for every variant, sharing one engine (one pass over the data).

    `request_store`: a sqlite file that keeps scored requests across an interruption. Extra
    keyword arguments (limit, num_fewshot, log_samples, ...) go to simple_evaluate unchanged.
    progress(done, total), if given, is called as requests are scored, counting each request
    once per variant. Under torchrun every process calls this; rank 0 gets the results
    (samples in document order), the others None for every variant."""
    _quiet_lm_eval_git()
    import lm_eval
    from lm_eval.tasks import TaskManager

    task_manager = TasksLoadedOnce(task_manager if task_manager is not None else TaskManager())
    store = RequestStore(request_store) if request_store is not None else None
    views = variant_views(lm, variants, batch_size, max_length, keep_first, store, logits_budget)
    if views:
        views[0].engine.on_progress = progress
    out = {}
    with (contextlib.closing(store) if store else contextlib.nullcontext()), quiet_lm_eval():
        for view in views:
            kwargs = dict(lm_eval_kwargs)
            if kwargs.get("use_cache"):  # lm-eval's response cache, one per variant: they answer differently
                kwargs["use_cache"] = f"{kwargs['use_cache']}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', view.variant.name)}"
            try:
                out[view.variant.name] = lm_eval.simple_evaluate(model=view, tasks=list(tasks),
                                                                 task_manager=task_manager, **kwargs)
            except KeyError as e:  # lm-eval raises KeyError for task names it cannot find
                raise UserError(f"unknown task {e}; list tasks with `lm-eval ls tasks`") from None
            if out[view.variant.name] is not None and distributed.world_size() > 1:
                _in_document_order(out[view.variant.name])
    return TaskResults(out, _all_processes(views[0].engine.forward_stats) if views else {})


def _in_document_order(results: dict) -> None:
    """lm-eval chains the gathered samples rank by rank (documents 0, 2, 4, ..., 1, 3, ...);
    sort each task's back to one process's order: filter by filter, document by document."""
    for docs in results.get("samples", {}).values():
        filters = list(dict.fromkeys(d.get("filter") for d in docs))
        docs.sort(key=lambda d: (filters.index(d.get("filter")), d["doc_id"]))


def _all_processes(stats: dict) -> dict:
    """The engine's counts summed over processes (the block costs are the same everywhere)."""
    parts = distributed.all_gather_objects(stats)
    return {**stats, **{k: sum(p[k] for p in parts) for k in ("tokens", "batches")}}
