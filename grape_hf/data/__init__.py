"""What the examples need: text corpora and BPE training (`text.py`), image data sets (`images.py`)
and metrics that load offline (`eval_metrics/`)."""
