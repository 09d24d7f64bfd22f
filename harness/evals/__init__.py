"""What is measured on a spliced model: the CE suite, where the damage lands (per token,
outliers), explainability measures and the optional LLM judge, measured scaling references."""
