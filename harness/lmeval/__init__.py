"""lm-evaluation-harness integration: the sae-spliced backend (every variant in one pass),
the offline task data, MMLU's task YAMLs and categories, shared lm-eval options, per-question
samples."""
