"""Where tokens come from: the built-in offline text (pydoc topics + stdlib source) and any
dataset named by --dataset, packed into rows."""
