"""Replacements (SAEs, transcoders, baselines) and how they are spliced into a model: the
replacement objects, the variant grammar (A+B, noise@S, S+error), the run-time splicer, the one
setup path (session), and generation with a splice in place."""
