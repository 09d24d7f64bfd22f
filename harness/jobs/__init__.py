"""Whole jobs that write one run folder: the main pipeline, run folders (staging, resume,
provenance), the family run, the interp job, talk/generations, and the speed benchmark."""
