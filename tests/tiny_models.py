"""Tiny, dropout-free models of each supported family, and batches for them."""

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, ViTConfig,
                          ViTForImageClassification)

VOCAB = 64


def tiny_gpt2(n_layer: int = 2, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config)


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=16,
                       patch_size=4, num_channels=3, num_labels=5, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config)


def token_batch(batch: int = 4, length: int = 16, seed: int = 1) -> dict:
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def image_batch(batch: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g),
            "labels": torch.randint(0, 5, (batch,), generator=g)}


def token_dataset(n: int = 16, length: int = 16):
    """`n` random token rows as a torch-formatted `datasets.Dataset` (input_ids, labels)."""
    import datasets

    batch = token_batch(batch=n, length=length)
    return datasets.Dataset.from_dict({k: v.tolist() for k, v in batch.items()}).with_format("torch")


def image_dataset(n: int = 8):
    """`n` random 3 x 16 x 16 images with labels in [0, 5), as a torch-formatted `datasets.Dataset`."""
    import datasets

    batch = image_batch(batch=n, seed=0)
    return datasets.Dataset.from_dict({k: v.tolist() for k, v in batch.items()}).with_format("torch")


def quick_args(tmp_path, **kwargs):
    """`GrapeTrainingArguments` of a 2-step CPU run (batch 4, lr 1e-2, no saving); `kwargs` override."""
    from grape_hf import GrapeTrainingArguments

    common = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                  use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0)
    return GrapeTrainingArguments(**{**common, **kwargs})
