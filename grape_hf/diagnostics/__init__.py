"""Diagnostics that observe a rule through the `grape_hf.rule.Rule` interface and never train:
the locality audit (`audit.py`) and the true-alignment probe (`probe.py`)."""
