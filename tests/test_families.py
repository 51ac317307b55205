"""Every model family the field trains, under DFA macro, DFA micro and GrAPE macro (issue 11).

Each cell builds a tiny model from its transformers config (no download), trains it 3 steps through
`GrapeTrainer`, and asserts that the locality audit passes, every trainable parameter moved, the loss
is finite, and the rule's hooks leave the forward (the logits) unchanged. A combination that cannot
work is a refusal whose message names the reason and the alternative. `python tests/test_families.py`
prints the table of results.
"""

import math
import os
import re
import sys
import tempfile

import pytest
import torch
from tiny_models import FAMILIES, FAMILY_LABELS, FAMILY_VOCAB
from transformers.trainer_callback import PrinterCallback

from grape_hf import GrapeTrainer, GrapeTrainingArguments

BATCH, LENGTH, STEPS = 2, 8, 3

CELLS = {
    "DFA macro": {"rule": "dfa", "setting": "macro"},
    "DFA micro": {"rule": "dfa", "setting": "micro"},
    "GrAPE macro": {"rule": "grape", "setting": "macro"},
    # Causal LMs read the error on the residual stream by default (the final norm's input, `find_final_norm`);
    # the head's input is the other choice.
    "DFA head input": {"rule": "dfa", "setting": "macro", "error_point": "head_input"},
}
LM_ONLY = {"DFA head input"}


def applies(family: str, cell: str) -> bool:
    return cell not in LM_ONLY or FAMILIES[family].kind == "lm"

# Parameters the model's own forward never uses (plain BP leaves them untouched too): they must not move.
UNUSED = {"DINOv2": {"dinov2.embeddings.mask_token"}}


def examples(kind: str, n: int = BATCH * STEPS, seed: int = 1) -> list[dict]:
    """`n` training examples of `kind`: token rows (labels = the ids), images, or padded text rows (a
    fixed length, the last two tokens of every other row padding) with class labels."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        if kind == "image":
            rows.append({"pixel_values": torch.randn(3, 16, 16, generator=g),
                         "labels": torch.randint(0, FAMILY_LABELS, (), generator=g)})
            continue
        ids = torch.randint(1, FAMILY_VOCAB, (LENGTH,), generator=g)
        if kind == "lm":
            rows.append({"input_ids": ids, "labels": ids.clone()})
        else:
            mask = torch.ones(LENGTH, dtype=torch.long)
            mask[LENGTH - 2:] = 0 if i % 2 else 1
            rows.append({"input_ids": ids * mask, "attention_mask": mask,
                         "labels": torch.randint(0, FAMILY_LABELS, (), generator=g)})
    return rows


def collate(rows: list[dict]) -> dict:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def logits_with_grad(model, batch: dict) -> torch.Tensor:
    """The logits of an evaluation-mode forward with gradients on (the rule's hooks act only then)."""
    model.eval()
    with torch.enable_grad():
        return model(**batch).logits.detach()


def run_cell(family: str, cell: str, output_dir: str) -> None:
    """Train `family` 3 steps under `cell` and check it (raises an AssertionError naming what failed)."""
    model = FAMILIES[family].build()
    data = examples(FAMILIES[family].kind)
    batch = collate(data[:BATCH])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    plain = logits_with_grad(model, batch)
    args = GrapeTrainingArguments(
        output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-2, use_cpu=True,
        report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0, **CELLS[cell])
    trainer = GrapeTrainer(model=model, args=args, train_dataset=data, data_collator=collate)
    trainer.remove_callback(PrinterCallback)  # the losses are read from log_history, not printed
    assert torch.equal(logits_with_grad(model, batch), plain), "the rule's hooks change the forward"
    with torch.enable_grad(), trainer.feedback.as_trained():
        dual = model.eval()(**batch).logits.detach()
    torch.testing.assert_close(dual, plain, rtol=1e-4, atol=1e-5, msg="the rule's training forward changes the logits")
    model.train()
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses), f"losses {losses}"
    still = {name for name, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[name])}
    assert still == UNUSED.get(family, set()), f"parameters that did not move: {sorted(still)}"
    report = trainer.audit_locality(batch)
    assert report.ok, report.describe()
    trainer.feedback.remove()


@pytest.mark.parametrize("family, cell", [pytest.param(f, c, id=f"{f}-{c}".replace(" ", "_"))
                                          for c in CELLS for f in FAMILIES if applies(f, c)])
def test_family(family, cell, tmp_path):
    run_cell(family, cell, str(tmp_path))


def outcome(family: str, cell: str) -> str:
    """'ok', 'refused: ...' or 'fails: ...' for the table."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            run_cell(family, cell, folder)
        except Exception as error:  # noqa: BLE001 - the table reports every failure, whatever its kind
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            kind = "refused" if isinstance(error, ValueError) else "fails"
            return f"{kind}: {type(error).__name__}: {re.sub(r'[|]', '/', first)[:160]}"
    return "ok"


def main() -> None:
    """Print the table of results in the issue's format (one row per family)."""
    wanted = sys.argv[1:] or list(FAMILIES)
    print("| family | " + " | ".join(CELLS) + " |")
    print("|---" * (len(CELLS) + 1) + "|")
    for family in wanted:
        print(f"| {family} | " + " | ".join(outcome(family, cell) if applies(family, cell) else "n/a (not an LM)"
                                             for cell in CELLS) + " |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
