"""DFA learns: a small GPT-2 trained with DFA on the embedded Shakespeare corpus lowers its eval loss."""

import math

from transformers import GPT2Config, GPT2LMHeadModel

from grape_hf import GrapeTrainer, GrapeTrainingArguments
from grape_hf.data import load_text_corpus, tokenize_and_chunk, train_bpe_tokenizer


def test_dfa_lowers_eval_loss_on_embedded_corpus(tmp_path):
    raw, description = load_text_corpus()  # offline in tests: the embedded corpus
    assert "Shakespeare" in description
    raw["train"] = raw["train"].select(range(20_000))
    tokenizer = train_bpe_tokenizer(raw["train"]["text"], vocab_size=1024)
    data = tokenize_and_chunk(raw, tokenizer, block_size=64)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    args = GrapeTrainingArguments(
        output_dir=str(tmp_path), rule="dfa", setting="macro", seed=0, max_steps=300, learning_rate=1e-3,
        per_device_train_batch_size=16, per_device_eval_batch_size=32, lr_scheduler_type="constant",
        use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=100,
    )
    trainer = GrapeTrainer(model=GPT2LMHeadModel(config), args=args, train_dataset=data["train"],
                           eval_dataset=data["validation"].select(range(128)))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert before > math.log(len(tokenizer)) - 0.5  # an untrained model is near-uniform
    assert after < before - 0.75, (before, after)
