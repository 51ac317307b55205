"""Tests run offline with a private Hugging Face cache, as CI does."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="grape_hf_test_hf_home_")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
