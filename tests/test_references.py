"""Measured scaling references: losses on the run's own tokens, family fit, N_eff / D_eff."""

from types import SimpleNamespace

import pytest
import torch

from harness.evals import references


def test_reference_loss_is_the_models_own_cross_entropy(tiny_hf, tiny_hf_dir):
    torch.manual_seed(0)
    tokens = torch.randint(3, 3000, (4, 16))  # no special tokens: every predicted position counts
    (point,) = references.measure(tiny_hf, [str(tiny_hf_dir)], tokens, 2, "cpu", "float32")
    hf = tiny_hf.model.original_model
    with torch.no_grad():
        want = hf(input_ids=tokens, labels=tokens).loss.item()
    assert point["loss"] == pytest.approx(want, abs=1e-5)
    assert point["N"] == sum(p.numel() for p in hf.parameters())


def _records(clean, spliced):
    rec = lambda name, ce, lo, hi: {"variant": name, "ce_clean": clean, "ce_spliced": ce,
                                    "dce_ci_low": lo, "dce_ci_high": hi}
    return [rec("clean", clean, 0.0, 0.0), rec("sae", spliced, spliced - clean - 0.01, spliced - clean + 0.01)]


def test_family_fit_gives_n_eff_of_the_known_law(monkeypatch, tiny_hf):
    """References lying exactly on L(N) = 2 + 300 N^-0.3: N_eff/N must be the law's own answer."""
    E, A, alpha = 2.0, 300.0, 0.3
    law = lambda n: E + A * n ** -alpha
    sizes = [1e5, 3e5, 1e6, 3e6, 1e7, 3e7]
    monkeypatch.setattr(references, "measure",
                        lambda lm, specs, *a: [{"model": s, "N": n, "loss": law(n)} for s, n in zip(specs, sizes)])
    N_main = references.parameter_count(tiny_hf)
    clean = law(N_main)
    spliced = clean + 0.1
    records = _records(clean, spliced)
    cfg = SimpleNamespace(reference_models=[f"m{i}" for i in range(len(sizes))], reference_tokens=[],
                          reference_checkpoints=[], checkpoint_tokens=[], batch_size=2, device="cpu",
                          dtype="float32", seed=0)
    info = references.add_reference_equivalents(records, tiny_hf, None, cfg)
    n_eff = (A / (spliced - E)) ** (1 / alpha)
    assert records[1]["n_eff_frac"] == pytest.approx(n_eff / N_main, rel=1e-3)
    assert records[1]["n_eff_frac_low"] < records[1]["n_eff_frac"] < records[1]["n_eff_frac_high"]
    assert records[0]["n_eff_frac"] == pytest.approx(1.0)
    assert info["family"]["law"]["E"] == pytest.approx(E, rel=1e-3)


def test_checkpoint_curve_gives_d_eff(monkeypatch, tiny_hf):
    E, B, beta = 2.5, 500.0, 0.35
    curve = lambda d: E + B * d ** -beta
    tokens_seen = [1e8, 3e8, 1e9, 3e9, 1e10, 3e10]
    final_D = 1e11
    monkeypatch.setattr(references, "measure",
                        lambda lm, specs, *a: [{"model": s, "N": 1, "loss": curve(d)} for s, d in zip(specs, tokens_seen)])
    clean = curve(final_D)
    records = _records(clean, clean + 0.05)
    cfg = SimpleNamespace(reference_models=[], reference_tokens=[], reference_checkpoints=[f"c{i}" for i in range(6)],
                          checkpoint_tokens=tokens_seen + [final_D], batch_size=2, device="cpu", dtype="float32", seed=0)
    references.add_reference_equivalents(records, tiny_hf, None, cfg)
    d_eff = (B / (clean + 0.05 - E)) ** (1 / beta)
    assert records[1]["d_eff_frac"] == pytest.approx(d_eff / final_D, rel=1e-3)


def test_other_tokenizer_is_refused(tiny_hf, tiny_hooked, monkeypatch):
    from harness.errors import UserError

    monkeypatch.setattr(references, "load_model", lambda *a, **k: SimpleNamespace(tokenizer=SimpleNamespace(get_vocab=lambda: {"a": 0})))
    with pytest.raises(UserError, match="another tokenizer"):
        references.measure(tiny_hf, ["other"], torch.zeros(1, 4, dtype=torch.long), 1, "cpu", "float32")
