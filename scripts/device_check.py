"""The prepared GPU check (scripts/device_check.sh): everything a lent device should measure,
in one go, written to one JSON and a Markdown summary.

1. `sae-harness bench` at the reference shape (random:24x2048, 4 SAEs, bfloat16);
2. the CE suite at a 262k vocabulary and context 1024, with its peak device memory;
3. bfloat16 against float32 on the embedded model (CE suite, the demo SAEs);
4. full offline MMLU (14,042 questions), clean + 4 SAEs, on the embedded model and on
   random:24x2048, timed.
`--cpu-smoke` runs the same steps on tiny shapes on the CPU, so the script is tested anywhere.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

FULL = dict(device="cuda", dtype="bfloat16", bench_model="random:24x2048", bench_tokens=16384,
            vocab_model="random:2x256:v262144", vocab_tokens=8192, vocab_ctx=1024, batch_size=8,
            embedded="smollm2-135m", embedded_saes=["l15-w2304-k32", "l15-w1152-k16", "l22-w1152-k32", "pca:32"],
            agree_tokens=8192, mmlu_limit=None, random_mmlu_model="random:24x2048")
# On the CPU the bench runs in float32: bfloat16 TopK codes of a random tiny SAE tie often, and
# lm-eval's HFLM and the harness then break the ties differently (the agreement check fails).
SMOKE = dict(device="cpu", dtype="float32", bench_model="random:2x64", bench_tokens=256,
             vocab_model="random:1x64:v65536", vocab_tokens=256, vocab_ctx=64, batch_size=4,
             embedded="random:2x64", embedded_saes=["zero@blocks.1.hook_resid_post", "pca:4@blocks.1.hook_resid_post",
                                                    "neurons:4@blocks.1.hook_resid_post", "mean@blocks.1.hook_resid_post"],
             agree_tokens=256, mmlu_limit=1, random_mmlu_model="random:2x64")


def peak_memory(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def ce_run(model: str, saes: list[str], dtype: str, p: dict, tokens: int, ctx: int, out: Path) -> dict:
    from harness.jobs.pipeline import RunConfig, run_job

    reset_peak(p["device"])
    t0 = time.perf_counter()
    cfg = RunConfig(model=model, saes=saes, tokens=tokens, ctx=ctx, batch_size=p["batch_size"], device=p["device"],
                    dtype=dtype, sae_dtype=dtype, n_boot=100, dataset="builtin", out=str(out))
    records = run_job(cfg, stages=("ce",)).ce.records
    return {"seconds": time.perf_counter() - t0, "peak_device_bytes": peak_memory(p["device"]),
            "records": {r["variant"]: {k: r.get(k) for k in ("ce_clean", "ce_spliced", "dce", "kl")} for r in records}}


def mmlu_run(model: str, saes: list[str] | None, p: dict, random_saes: bool = False) -> dict:
    from harness.jobs import bench
    from harness.lmeval.backend import evaluate_tasks
    from harness.jobs.pipeline import checked_task_manager
    from harness.splice.session import prepare

    t0 = time.perf_counter()
    if random_saes:
        session = prepare(model, device=p["device"], dtype=p["dtype"], batch_size=p["batch_size"],
                          make_replacements=bench._random_saes(model, 4, p["device"], p["dtype"], 0))
    else:
        session = prepare(model, saes, device=p["device"], dtype=p["dtype"], batch_size=p["batch_size"])
    loaded = time.perf_counter() - t0
    res = evaluate_tasks(session.lm, session.variants, ["mmlu_offline"], checked_task_manager(["mmlu_offline"]),
                         batch_size=p["batch_size"],
                         limit=p["mmlu_limit"])
    acc = {name: r["results"]["mmlu_offline"]["acc,none"] for name, r in res.by_variant.items()}
    return {"model": model, "variants": list(acc), "accuracy": acc, "load_seconds": loaded,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (tests the script)")
    ap.add_argument("--out", default="results/gpu")
    args = ap.parse_args()
    p = SMOKE if args.cpu_smoke else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from harness.jobs import bench
    from harness.jobs.runfolder import machine, versions

    report: dict = {"mode": "cpu-smoke" if args.cpu_smoke else "full", "machine": machine(), "versions": versions(),
                    "params": p}
    t0 = time.perf_counter()
    reset_peak(p["device"])
    b = bench.run_bench(p["bench_model"], device=p["device"], dtype=p["dtype"], saes=4, tokens=p["bench_tokens"],
                        ctx=128 if not args.cpu_smoke else 32, batch_size=p["batch_size"], mmlu_questions=8, seed=0)
    report["bench"] = {"rows": b["rows"], "checks": b["checks"], "seconds": time.perf_counter() - t0,
                       "peak_device_bytes": peak_memory(p["device"])}
    work = out / "runs"
    report["ce_262k"] = ce_run(p["vocab_model"], [f"pca:8@blocks.{1 if not args.cpu_smoke else 0}.hook_resid_post"],
                               p["dtype"], p, p["vocab_tokens"], p["vocab_ctx"], work / "ce_vocab")
    agree = {d: ce_run(p["embedded"], p["embedded_saes"], d, p, p["agree_tokens"], 128 if not args.cpu_smoke else 32,
                       work / f"agree_{d}") for d in ("float32", "bfloat16")}
    report["bf16_vs_fp32"] = {
        "float32": agree["float32"]["records"], "bfloat16": agree["bfloat16"]["records"],
        "max_abs_dce_difference": max(abs(agree["bfloat16"]["records"][v]["dce"] - r["dce"])
                                      for v, r in agree["float32"]["records"].items())}
    report["mmlu"] = [mmlu_run(p["embedded"], p["embedded_saes"], p),
                      mmlu_run(p["random_mmlu_model"], None, p, random_saes=True)]
    report["seconds"] = time.perf_counter() - t0
    (out / "device_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "device_check.md").write_text(summary(report))
    print(summary(report))


def summary(r: dict) -> str:
    gib = lambda b: "n/a (CPU)" if b is None else f"{b / 2**30:.2f} GiB"
    lines = [f"# Device check ({r['mode']})", "", f"machine: {r['machine']}", "",
             "| what | value |", "|---|---|"]
    for row in r["bench"]["rows"]:
        lines.append(f"| bench {row['key']}: harness / reference | {row['ratio']:.2f}x |")
    ok = sum(c["ok"] for c in r["bench"]["checks"])
    lines.append(f"| bench agreement checks | {ok}/{len(r['bench']['checks'])} |")
    lines.append(f"| CE at {r['params']['vocab_model']}, ctx {r['params']['vocab_ctx']}: time, peak memory | "
                 f"{r['ce_262k']['seconds']:.1f} s, {gib(r['ce_262k']['peak_device_bytes'])} |")
    lines.append(f"| bfloat16 vs float32, max abs dCE difference | {r['bf16_vs_fp32']['max_abs_dce_difference']:.4f} |")
    for m in r["mmlu"]:
        lines.append(f"| MMLU ({len(m['variants'])} variants) on {m['model']} | {m['seconds']:.1f} s |")
    lines.append(f"| whole check | {r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
