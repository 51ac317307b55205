"""Tiny, dropout-free models of each supported family, and batches for them."""

from dataclasses import dataclass, field

import torch
import transformers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

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


# Every family of issue 11, tiny (2 layers, d 32, vocab 100) and dropout-free ------------------------------------
FAMILY_VOCAB, FAMILY_LABELS = 100, 5
LAYERS_32 = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2}
TOKENS = {"bos_token_id": 0, "eos_token_id": 0}
# The decoder LMs' shared tiny sizes (families with their own field names spell them out).
DECODER = {**LAYERS_32, **TOKENS, "intermediate_size": 64, "num_key_value_heads": 1, "max_position_embeddings": 64,
           "pad_token_id": 0}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
VIT = {**LAYERS_32, **NO_DROPOUT, "intermediate_size": 64, "image_size": 16, "patch_size": 4}
GPT2_STYLE = {**TOKENS, "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "resid_pdrop": 0.0,
              "embd_pdrop": 0.0, "attn_pdrop": 0.0}
ENCODER = {**LAYERS_32, "intermediate_size": 64, "max_position_embeddings": 64}


@dataclass(frozen=True)
class Family:
    """A tiny model: `config` and `model` name the transformers classes, `fields` the config's fields, and
    `kind` its inputs: 'lm' token ids with labels, 'image' 3 x 16 x 16 images, 'text' token rows with class labels."""

    config: str
    model: str
    kind: str
    fields: dict = field(default_factory=dict)

    def build(self) -> torch.nn.Module:
        torch.manual_seed(0)
        extra = {"vocab_size": FAMILY_VOCAB} if self.kind != "image" else {}
        extra.update({"num_labels": FAMILY_LABELS} if self.kind != "lm" else {})
        return getattr(transformers, self.model)(getattr(transformers, self.config)(**extra, **self.fields))


FAMILIES = {
    "GPT-2": Family("GPT2Config", "GPT2LMHeadModel", "lm", GPT2_STYLE),
    "Llama": Family("LlamaConfig", "LlamaForCausalLM", "lm", DECODER),
    "Mistral": Family("MistralConfig", "MistralForCausalLM", "lm", DECODER),
    "Qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", "lm", DECODER),
    "Qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", "lm", {**DECODER, "head_dim": 16}),
    "ViT": Family("ViTConfig", "ViTForImageClassification", "image", VIT),
    "Gemma": Family("GemmaConfig", "GemmaForCausalLM", "lm", {**DECODER, "head_dim": 16}),
    "Phi-3": Family("Phi3Config", "Phi3ForCausalLM", "lm", DECODER),
    "GPT-NeoX": Family("GPTNeoXConfig", "GPTNeoXForCausalLM", "lm", {**ENCODER, **TOKENS}),
    "StableLM": Family("StableLmConfig", "StableLmForCausalLM", "lm", DECODER),
    "OLMo": Family("OlmoConfig", "OlmoForCausalLM", "lm", DECODER),
    "DeiT": Family("DeiTConfig", "DeiTForImageClassification", "image", VIT),
    "Gemma-2": Family("Gemma2Config", "Gemma2ForCausalLM", "lm", {**DECODER, "head_dim": 16}),
    "Gemma-3": Family("Gemma3TextConfig", "Gemma3ForCausalLM", "lm", {**DECODER, "head_dim": 16}),
    "OLMo-2": Family("Olmo2Config", "Olmo2ForCausalLM", "lm", DECODER),
    "DINOv2": Family("Dinov2Config", "Dinov2ForImageClassification", "image",
                     {**LAYERS_32, **NO_DROPOUT, "mlp_ratio": 2, "image_size": 16, "patch_size": 4}),
    "BEiT": Family("BeitConfig", "BeitForImageClassification", "image",
                   {**VIT, "use_mean_pooling": True, "layer_scale_init_value": 0.1}),
    "Phi": Family("PhiConfig", "PhiForCausalLM", "lm", DECODER),
    "Falcon": Family("FalconConfig", "FalconForCausalLM", "lm", {**LAYERS_32, **TOKENS}),
    "GPT-J": Family("GPTJConfig", "GPTJForCausalLM", "lm", {**GPT2_STYLE, "rotary_dim": 8}),
    "OPT": Family("OPTConfig", "OPTForCausalLM", "lm", {**LAYERS_32, **TOKENS, "ffn_dim": 64, "dropout": 0.0,
                                                        "max_position_embeddings": 64, "word_embed_proj_dim": 32,
                                                        "pad_token_id": 1}),
    "BLOOM": Family("BloomConfig", "BloomForCausalLM", "lm", {**TOKENS, "n_layer": 2, "hidden_size": 32, "n_head": 2}),
    "Mixtral": Family("MixtralConfig", "MixtralForCausalLM", "lm",
                      {**DECODER, "num_local_experts": 2, "num_experts_per_tok": 1}),
    "Qwen2-MoE": Family("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "lm",
                        {**DECODER, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 32,
                         "shared_expert_intermediate_size": 32}),
    "Swin": Family("SwinConfig", "SwinForImageClassification", "image",
                   {**NO_DROPOUT, "image_size": 16, "patch_size": 2, "embed_dim": 16, "depths": [2, 2],
                    "num_heads": [2, 2], "window_size": 2, "drop_path_rate": 0.0}),
    "ConvNeXt": Family("ConvNextConfig", "ConvNextForImageClassification", "image",
                       {"image_size": 16, "hidden_sizes": [8, 16], "depths": [2, 2], "num_stages": 2, "patch_size": 2}),
    "HF ResNet": Family("ResNetConfig", "ResNetForImageClassification", "image",
                        {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}),
    "BERT": Family("BertConfig", "BertForSequenceClassification", "text", {**ENCODER, **NO_DROPOUT}),
    "ModernBERT": Family("ModernBertConfig", "ModernBertForSequenceClassification", "text",
                         {**ENCODER, **TOKENS, "pad_token_id": 0, "cls_token_id": 0, "sep_token_id": 0}),
}
