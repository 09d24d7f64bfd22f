"""lm-eval task YAMLs shipped with sae-harness (installed as the package harness.tasks)."""
