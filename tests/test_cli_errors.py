"""Bad input: one clear line on stderr, exit code 2, no run folder written."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_topk_sae
from harness.cli.app import app

HOOK = "blocks.1.hook_resid_post"


def _save_sae(folder, tiny_hf_dir, d_in=32, model_name=None, nan=False):
    sae = make_topk_sae(d_in, 64, 4, HOOK, model_name or str(tiny_hf_dir))
    if nan:
        with torch.no_grad():
            sae.W_enc[0, 0] = float("nan")
    sae.save_model(folder)
    return folder


def _run(args, out):
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    return result.exit_code, lines


def _ce(tiny_hf_dir, sae, tmp_path):
    out = tmp_path / "run"
    code, lines = _run(["ce", "--model", str(tiny_hf_dir), "--sae", str(sae), "--tokens", "64", "--ctx", "16", "--dataset", "builtin"], out)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert not out.exists() and not list(tmp_path.glob(".run*"))
    return lines[0]


def test_unknown_hook_lists_valid_hooks(tiny_hf_dir, tmp_path):
    line = _ce(tiny_hf_dir, "zero@blocks.1.hook_bogus", tmp_path)
    assert "unknown hook 'blocks.1.hook_bogus'" in line and "blocks.{0..3}.hook_resid_post" in line


def test_width_mismatch(tiny_hf_dir, tmp_path):
    sae = _save_sae(tmp_path / "wide", tiny_hf_dir, d_in=48)
    assert "has width 48 but blocks.1.hook_resid_post has width 32" in _ce(tiny_hf_dir, sae, tmp_path)


def test_missing_folder_and_missing_weights(tiny_hf_dir, tmp_path):
    assert "not found" in _ce(tiny_hf_dir, tmp_path / "nowhere", tmp_path)
    half = tmp_path / "half"
    half.mkdir()
    (half / "cfg.json").write_text("{}")
    assert "in no known format; tried sae-lens (cfg.json + sae_weights.safetensors); sparsify" in _ce(tiny_hf_dir, half, tmp_path)


def test_corrupt_safetensors(tiny_hf_dir, tmp_path):
    sae = _save_sae(tmp_path / "corrupt", tiny_hf_dir)
    (sae / "sae_weights.safetensors").write_bytes(b"\x00garbage" * 10)
    assert "cannot load sae-lens SAE" in _ce(tiny_hf_dir, sae, tmp_path)


def test_corrupt_cfg(tiny_hf_dir, tmp_path):
    sae = _save_sae(tmp_path / "badcfg", tiny_hf_dir)
    (sae / "cfg.json").write_text("{not json")
    assert "is not valid JSON" in _ce(tiny_hf_dir, sae, tmp_path)


def test_nan_weights(tiny_hf_dir, tmp_path):
    sae = _save_sae(tmp_path / "nan", tiny_hf_dir, nan=True)
    assert "NaN" in _ce(tiny_hf_dir, sae, tmp_path)


def test_sae_for_another_model(tiny_hf_dir, tmp_path):
    sae = _save_sae(tmp_path / "other", tiny_hf_dir, model_name="gpt2-small")
    assert "was trained on 'gpt2-small'" in _ce(tiny_hf_dir, sae, tmp_path)


def test_bad_baseline_spec(tiny_hf_dir, tmp_path):
    assert "needs a size" in _ce(tiny_hf_dir, f"pca@{HOOK}", tmp_path)


def test_unknown_task(tiny_hf_dir, tmp_path):
    out = tmp_path / "run"
    code, lines = _run(["lm-eval", "--model", str(tiny_hf_dir), "--tasks", "no_such_task", "--limit", "2"], out)
    assert code == 2 and len(lines) == 1 and "unknown task" in lines[0]
    assert not out.exists()


def test_malformed_task_yaml(tiny_hf_dir, tmp_path):
    bad = tmp_path / "tasks"
    bad.mkdir()
    (bad / "broken.yaml").write_text("task: broken\n  dataset_path: [unclosed\n")
    out = tmp_path / "run"
    code, lines = _run(["lm-eval", "--model", str(tiny_hf_dir), "--tasks", "broken", "--include-path", str(bad)], out)
    assert code == 2 and len(lines) == 1 and "malformed task YAML" in lines[0]
    assert not out.exists()


def test_fit_law_bad_points(tmp_path):
    pts = tmp_path / "p.csv"
    pts.write_text("N,D,loss\n1e6,1e9,3.0\n-5,1e9,2.9\n")
    result = CliRunner().invoke(app, ["fit-law", str(pts)])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["error: N must be finite and positive (got min -5)"]


def test_equiv_below_E():
    result = CliRunner().invoke(app, ["equiv", "--clean", "3.0", "--spliced", "1.5", "--law", "hoffmann"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: spliced loss 1.5000 is at or below the law's irreducible loss E=1.6900")
    assert len(result.stderr.splitlines()) == 1


def test_table_missing_run(tmp_path):
    result = CliRunner().invoke(app, ["table", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_lm_eval_command_writes_tables(tiny_hf_dir, tmp_path):
    """The success path: clean + a baseline on two MMLU subjects; tables rebuild from the folder."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["lm-eval", "--model", str(tiny_hf_dir), "--sae", f"zero@{HOOK}",
                                      "--tasks", "mmlu_offline_anatomy,mmlu_offline_virology", "--limit", "3",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    import pandas as pd

    per_q = pd.read_csv(out / "per_question.csv")
    assert sorted(per_q.variant.unique()) == ["clean", "zero@1.resid_post"] and len(per_q) == 2 * 6
    agg = json.loads((out / "lm_eval_results.json").read_text())
    acc = agg["clean"]["mmlu_offline_anatomy"]["acc,none"]
    assert acc == per_q[(per_q.variant == "clean") & (per_q.subject == "anatomy")].correct.mean()


def test_model_path_that_does_not_exist(tmp_path):
    out = tmp_path / "run"
    code, lines = _run(["ce", "--model", str(tmp_path / "no" / "such-model"), "--sae", f"zero@{HOOK}",
                        "--tokens", "64", "--ctx", "16"], out)
    assert code == 2 and len(lines) == 1
    assert lines[0] == f"error: model folder {tmp_path / 'no' / 'such-model'} does not exist"
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(tiny_hf_dir, tmp_path):
    out = tmp_path / "run"
    code, lines = _run(["ce", "--model", str(tiny_hf_dir), "--sae", f"zero@{HOOK}", "--device", "cuda",
                        "--tokens", "64", "--ctx", "16"], out)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: --device cuda: CUDA is not available on this machine")
    assert not out.exists()


def test_bad_law_file_is_refused_before_any_model_work(tiny_hf_dir, tmp_path, monkeypatch):
    import harness.splice.session

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the law was checked")

    monkeypatch.setattr(harness.splice.session, "load_model", no_model)
    for text, why in (("{not json", "is not valid JSON"), ('{"E": 1.7, "A": 400}', "is not a usable law"),
                      ('{"E": 1.7, "A": 400, "B": 400, "alpha": 0.3}', "lacks law parameters ['beta']")):
        law = tmp_path / "law.json"
        law.write_text(text)
        out = tmp_path / "run"
        code, lines = _run(["ce", "--model", str(tiny_hf_dir), "--sae", f"zero@{HOOK}", "--dataset", "builtin", "--law", str(law),
                            "--tokens", "64", "--ctx", "16"], out)
        assert code == 2 and len(lines) == 1 and why in lines[0], lines
        assert not out.exists()


@pytest.mark.parametrize("law", [{"E": 1.8, "A": 400.0, "alpha": 0.34},
                                 {"E": 1.8, "A": 400.0, "B": 0.0, "alpha": 0.34, "beta": 0.28}])
def test_equiv_with_a_family_law_gives_n_eff(tmp_path, law):
    """A law with no D term, used with --params: N_eff/N from L(N) = E + A/N^alpha (closed form)."""
    path = tmp_path / "family.json"
    path.write_text(json.dumps(law))
    result = CliRunner().invoke(app, ["equiv", "--clean", "3.0", "--spliced", "3.1", "--law", str(path),
                                      "--params", "1e8", "--json"])
    assert result.exit_code == 0, result.stderr
    got = json.loads(result.stdout)
    want = ((3.1 - 1.8) / (3.0 - 1.8)) ** (-1 / 0.34)
    assert got["n_eff_frac"] == pytest.approx(want, rel=1e-12)
    assert got["n_eff"] == pytest.approx(want * 1e8, rel=1e-12)


@pytest.mark.parametrize("option,value", [("--train-tokens", "lots"), ("--train-tokens", "-1e12"),
                                          ("--params", "0"), ("--params", "nan")])
def test_train_tokens_and_params_must_be_positive_numbers(tiny_hf_dir, tmp_path, option, value):
    out = tmp_path / "run"
    code, lines = _run(["ce", "--model", str(tiny_hf_dir), "--sae", "zero@" + HOOK, "--tokens", "64", "--ctx", "16",
                        "--dataset", "builtin", option, value], out)
    assert code == 2 and len(lines) == 1 and lines[0] == f"error: {option} must be a positive number, got {value!r}"
    assert not out.exists()


def test_sae_for_another_model_says_what_to_do_and_the_override_accepts_it(tiny_hf_dir, tmp_path):
    sae = _save_sae(tmp_path / "other", tiny_hf_dir, model_name="gpt2-small")
    assert _ce(tiny_hf_dir, sae, tmp_path).endswith("pass --allow-model-mismatch")
    out = tmp_path / "accepted"
    result = CliRunner().invoke(app, ["ce", "--model", str(tiny_hf_dir), "--sae", str(sae), "--tokens", "64",
                                      "--ctx", "16", "--dataset", "builtin", "--allow-model-mismatch",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: SAE")]
    assert len(warnings) == 1 and "'gpt2-small'" in warnings[0]
    assert (out / "metrics.json").is_file()


@pytest.mark.slow
def test_sae_naming_the_embedded_models_hub_id_runs_without_edits(tmp_path):
    """What sae-lens writes for SmolLM2-135M-Instruct as model_name is the embedded default."""
    sae = make_topk_sae(576, 1152, 16, "blocks.15.hook_resid_post", "HuggingFaceTB/SmolLM2-135M-Instruct")
    sae.save_model(tmp_path / "mine")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["ce", "--sae", str(tmp_path / "mine"), "--tokens", "256", "--ctx", "64",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith(("warning", "error"))]
    assert json.loads((out / "metrics.json").read_text())[1]["variant"].endswith("mine")


def test_an_existing_run_folder_is_never_replaced_unasked(tiny_hf_dir, tmp_path, monkeypatch):
    """ce / run / lm-eval into an existing folder: one line naming --overwrite and --resume, exit
    2, the folder untouched, and no model loaded (checked first); --overwrite replaces it."""
    import harness.splice.session as session

    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    loads = []
    monkeypatch.setattr(session, "load_model", lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    for cmd in (["ce", "--sae", f"zero@{HOOK}"], ["run", "--sae", f"zero@{HOOK}", "--no-family"],
                ["lm-eval", "--sae", f"zero@{HOOK}", "--tasks", "mmlu_offline_anatomy"]):
        code, lines = _run([*cmd, "--model", str(tiny_hf_dir)], out)
        assert code == 2 and len(lines) == 1, lines
        assert lines[0] == (f"error: {out} already exists: pass --overwrite to replace it (once the new run is "
                            "complete), or --resume to continue an interrupted run, or choose another --out")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not loads
    monkeypatch.undo()
    result = CliRunner().invoke(app, ["ce", "--model", str(tiny_hf_dir), "--sae", f"zero@{HOOK}", "--tokens", "64",
                                      "--ctx", "16", "--dataset", "builtin", "--overwrite", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert (out / "metrics.json").is_file() and not (out / "keep.txt").exists()


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_every_json_a_run_writes_is_strict(tiny_hf_dir, tmp_path):
    """No NaN / Infinity anywhere (JSON.parse and other strict readers reject them): a value the
    run cannot give is null. The zero ablation's compute fraction is not finite: null."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["ce", "--model", str(tiny_hf_dir), "--sae", f"zero@{HOOK}", "--sae",
                                      f"pca:4@{HOOK}", "--tokens", "64", "--ctx", "16", "--dataset", "builtin",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    found = sorted(out.rglob("*.json"))
    assert {p.name for p in found} >= {"metrics.json", "config.json", "compute_equivalents.json", "damage.json"}
    for path in found:
        _strict(path.read_text())
    assert _strict("[1.0]") == [1.0]
    with pytest.raises(ValueError, match="not strict"):
        _strict("[NaN]")


def test_a_missing_dataset_file_is_refused_before_the_model_loads(tiny_hf_dir, tmp_path, monkeypatch):
    import harness.splice.session as session

    monkeypatch.setattr(session, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    out = tmp_path / "run"
    code, lines = _run(["ce", "--model", str(tiny_hf_dir), "--sae", f"zero@{HOOK}", "--dataset",
                        str(tmp_path / "nowhere.jsonl")], out)
    assert code == 2 and lines == [f"error: no such file or folder: {tmp_path / 'nowhere.jsonl'}"]
    assert not out.exists()


def test_bad_transcoder_set_is_one_line(tiny_hf_dir, tmp_path):
    """A circuit-tracer CLT with a layer's decoder missing: one line, exit 2, nothing written."""
    from safetensors.torch import save_file

    clt = tmp_path / "clt"
    clt.mkdir()
    for i in range(4):
        save_file({f"W_enc_{i}": torch.zeros(8, 32), f"b_enc_{i}": torch.zeros(8), f"b_dec_{i}": torch.zeros(32)},
                  str(clt / f"W_enc_{i}.safetensors"))
        if i != 3:
            save_file({f"W_dec_{i}": torch.zeros(8, 4 - i, 32)}, str(clt / f"W_dec_{i}.safetensors"))
    (clt / "config.yaml").write_text("model_kind: cross_layer_transcoder\nfeature_input_hook: mlp.hook_in\n"
                                     "feature_output_hook: hook_mlp_out\n")
    line = _ce(tiny_hf_dir, clt, tmp_path)
    assert "decoder file of layer 3 is missing" in line
