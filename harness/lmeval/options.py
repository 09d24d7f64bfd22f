"""lm-eval's own `run` options for `sae-harness lm-eval`, read by lm-eval's own parser.

`sae-harness lm-eval` takes the harness's --model / --sae / --dtype / --out, and every option of
`lm-eval run` (--tasks, --limit, --samples, --num_fewshot, --batch_size, --device, --seed,
--include_path, --output_path, --log_samples, --apply_chat_template, --fewshot_as_multiturn,
--system_instruction, --gen_kwargs, --use_cache, --cache_requests, --metadata, ...): the
arguments go through lm-eval's argparse parser and its EvaluatorConfig checks, so names,
types and cross-checks (e.g. --log_samples needs --output_path) are lm-eval's. `--output_path`
gets lm-eval's results JSON (and samples) per variant, written by lm-eval's EvaluationTracker.
Options that make no sense here are refused in one line.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import UserError

REFUSED = {
    "model_args": "the model is --model and the SAEs --sae",
    "predict_only": "the harness needs lm-eval's metrics for its tables",
    "wandb_args": "logging to W&B needs the network",
    "wandb_config_args": "logging to W&B needs the network",
    "trackio_args": "logging to Trackio needs the network",
    "hf_hub_log_args": "pushing to the Hugging Face Hub needs the network",
}
DEFAULT_TASKS = ["mmlu_offline"]
DEFAULT_BATCH_SIZE = 8


@dataclass
class LmEvalOptions:
    tasks: list[str]
    limit: float | None
    num_fewshot: int | None
    batch_size: int
    device: str
    include_path: str | None
    output_path: str | None
    log_samples: bool
    evaluate_kwargs: dict = field(default_factory=dict)  # the rest, for lm_eval.simple_evaluate
    given: dict = field(default_factory=dict)  # what was on the command line, for config.json


def check_task_list(text: str, option: str) -> list[str]:
    """`a,b` -> [a, b]; an empty list or an empty item (`a,,b`, `,`) is a user error, not the
    default tasks in disguise."""
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise UserError(f"{option} names no task (got {text!r})")
    if not all(items):
        raise UserError(f"{option} has an empty task name in {text!r}")
    return items


def check_limit(value, option: str) -> None:
    """A limit counts documents (or a fraction of them): it must be positive."""
    try:
        ok = float(value) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{option} must be positive (documents per task, or a fraction in (0, 1)), got {value}")


def _raise(message: str):
    raise UserError(f"lm-eval option: {message}")


def parser() -> argparse.ArgumentParser:
    """lm-eval's own `run` parser, raising UserError instead of printing usage and exiting."""
    from lm_eval._cli.run import Run

    root = argparse.ArgumentParser(prog="sae-harness")
    run = Run.create(root.add_subparsers())
    run._parser.prog = "sae-harness lm-eval"
    run._parser.error = _raise
    return run._parser


def _underscored(args: list[str], known: set[str]) -> list[str]:
    """--batch-size -> --batch_size (lm-eval spells its options with underscores)."""
    out = []
    for arg in args:
        name, eq, value = arg.partition("=")
        fixed = name.replace("-", "_").replace("__", "--", 1)
        out.append(fixed + eq + value if name.startswith("--") and fixed in known else arg)
    return out


def parse(args: list[str]) -> LmEvalOptions:
    """Command-line words left over by the harness's own options -> LmEvalOptions."""
    from lm_eval.config.evaluate_config import EvaluatorConfig

    p = parser()
    known = {s for a in p._actions for s in a.option_strings}
    ns = p.parse_args(_underscored(args, known))
    given = {k: v for k, v in vars(ns).items() if k != "func" and v is not None and v is not argparse.SUPPRESS}
    for key, why in REFUSED.items():
        if given.get(key):
            raise UserError(f"--{key} is not supported by sae-harness lm-eval: {why}")
    if given.get("tasks") is not None:
        check_task_list(given["tasks"] if isinstance(given["tasks"], str) else ",".join(given["tasks"]), "--tasks")
    if given.get("limit") is not None:
        check_limit(given["limit"], "--limit")
    if not getattr(ns, "tasks", None):
        ns.tasks = list(DEFAULT_TASKS)
    try:
        cfg = EvaluatorConfig.from_cli(ns)
    except (ValueError, TypeError) as e:
        raise UserError(" ".join(str(e).split())) from None
    batch = given.get("batch_size", DEFAULT_BATCH_SIZE)
    if not re.fullmatch(r"\d+", str(batch)) or int(batch) < 1:
        raise UserError(f"--batch_size must be a positive integer here, got {batch!r}")
    cache = cfg.cache_requests or {}
    seeds = cfg.seed or [None] * 4
    kwargs = {
        "samples": cfg.samples, "use_cache": cfg.use_cache, "check_integrity": cfg.check_integrity,
        "write_out": cfg.write_out, "system_instruction": cfg.system_instruction,
        "apply_chat_template": cfg.apply_chat_template, "fewshot_as_multiturn": cfg.fewshot_as_multiturn,
        "gen_kwargs": cfg.gen_kwargs or None, "metadata": cfg.metadata or None,
        "cache_requests": cache.get("cache_requests", False),
        "rewrite_requests_cache": cache.get("rewrite_requests_cache", False),
        "delete_requests_cache": cache.get("delete_requests_cache", False),
        "confirm_run_unsafe_code": cfg.confirm_run_unsafe_code,
        **dict(zip(("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed"), seeds)),
    }
    return LmEvalOptions(tasks=list(cfg.tasks), limit=cfg.limit, num_fewshot=cfg.num_fewshot, batch_size=int(batch),
                         device=given.get("device", "cpu"), include_path=cfg.include_path,
                         output_path=cfg.output_path, log_samples=bool(cfg.log_samples),
                         evaluate_kwargs={k: v for k, v in kwargs.items() if v is not None}, given=given)


def save_lm_eval_outputs(output_path: str, model_spec: str, raw: dict, log_samples: bool,
                         options: LmEvalOptions) -> list[Path]:
    """lm-eval's results JSON (and, with log_samples, samples JSONL) for every variant, written
    by lm-eval's own EvaluationTracker into OUTPUT_PATH/<variant>/<model>/ (lm-eval's layout,
    one folder per variant). Returns the results files written."""
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import sanitize_model_name

    written = []
    for variant, results in raw.items():
        results = dict(results)
        samples = results.pop("samples", None)
        folder = Path(output_path) / sanitize_model_name(variant)
        tracker = EvaluationTracker(output_path=str(folder))
        tracker.general_config_tracker.log_experiment_args(
            model_source="sae-spliced", model_args=f"model={model_spec},sae={variant}",
            system_instruction=options.evaluate_kwargs.get("system_instruction"), chat_template=None,
            fewshot_as_multiturn=bool(options.evaluate_kwargs.get("fewshot_as_multiturn")))
        tracker.save_results_aggregated(results=results, samples=samples if log_samples else None)
        if log_samples and samples:
            for task_name in results.get("configs", {}):
                if task_name in samples:
                    tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        written += sorted(folder.glob("**/results_*.json"))
    return written
