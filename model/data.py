"""An enterprise's local text data: finding, reading and checking it, tokenizing it into
fixed-length blocks or one record per row, splitting.

Accepted files: JSONL or CSV with either a `text` column or `instruction` + `response` columns;
Parquet when pyarrow is installed. An enterprise's data is one training file with an optional
held-out file, or a folder holding `train.<ext>` and optionally `heldout.<ext>`; without a
held-out file, one is carved out of the training records by a fixed rule (`carve_heldout`).
Records are tokenized, joined with EOS and cut into blocks of `seq_len` tokens, so no padding is
needed and every example (block) has the same length. torch is imported where tensors are made:
checking a run config reads records without it.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n### Response:\n{response}"
SUPPORTED_SUFFIXES = (".jsonl", ".csv", ".parquet")
# One record this long is a data error, and tokenizing it whole would take gigabytes.
MAX_RECORD_CHARS = 1_000_000


def record_text(record: dict, where: str) -> str:
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("instruction"), str) and isinstance(record.get("response"), str):
        return PROMPT_TEMPLATE.format(
            instruction=record["instruction"], response=record["response"]
        )
    keys = sorted(str(k) for k in record)  # a CSV row longer than its header has a None key
    raise ValueError(
        f"{where}: a record needs a 'text' field or 'instruction' and 'response' fields, got keys {keys}"
    )


def read_records(path: Path) -> list[dict]:
    """Every record of a JSONL, CSV or Parquet file; each must be an object (a row)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    try:
        if path.suffix == ".jsonl":
            records = []
            with path.open(encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except RecursionError:
                        raise ValueError(
                            f"{path}:{line_no}: not valid JSON (nested too deeply)"
                        ) from None
                    except ValueError as e:  # bad JSON, or an integer too long for Python
                        problem = getattr(e, "msg", str(e).split("; use ")[0])
                        raise ValueError(f"{path}:{line_no}: not valid JSON ({problem})") from None
                    if not isinstance(record, dict):
                        raise ValueError(
                            f"{path}:{line_no}: a record must be a JSON object, got {type(record).__name__}"
                        )
                    records.append(record)
            return records
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                try:
                    return list(reader)
                except csv.Error as e:  # e.g. a field over csv's 131,072-character limit
                    # line_num counts the lines csv finished; the bad row starts on the next one.
                    raise ValueError(f"{path}:{reader.line_num + 1}: not valid CSV ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(
                f"{path}: reading Parquet needs pyarrow (pip install pyarrow)"
            ) from None
        try:
            return pq.read_table(path).to_pylist()
        except (
            OSError,
            ValueError,
        ) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
            raise ValueError(f"{path}: not a readable Parquet file ({str(e)[:300]})") from None
    raise ValueError(
        f"{path}: unsupported data file type {path.suffix!r}; use one of {SUPPORTED_SUFFIXES}"
    )


def find_split(directory: Path, split: str) -> Path:
    """`<directory>/<split>.{jsonl,csv,parquet}`, the layout of an enterprise's data folder."""
    for suffix in SUPPORTED_SUFFIXES:
        candidate = Path(directory) / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no {split}{{{','.join(SUPPORTED_SUFFIXES)}}} in the folder {directory}: a data folder "
        "holds train.jsonl (and optionally heldout.jsonl); or point data at one file of records"
    )


# The held-out share carved out of a training file when no held-out file is given.
HELDOUT_SHARE = 0.1
_HELDOUT_SALT = b"fedmoe-heldout-v1:"


@dataclass(frozen=True)
class DataFiles:
    """Where an enterprise's records are: a training file, and a held-out file or None (then
    the held-out records are carved out of the training file, see `carve_heldout`)."""

    train: Path
    heldout: Path | None = None

    @classmethod
    def locate(cls, data: Path, heldout: Path | None = None) -> DataFiles:
        """`data` is a file of training records, or a folder with `train.<ext>` and optionally
        `heldout.<ext>`; an explicit `heldout` file wins over the folder's."""
        data = Path(data)
        if data.is_dir():
            if heldout is None:
                try:
                    heldout = find_split(data, "heldout")
                except FileNotFoundError:
                    heldout = None
            return cls(find_split(data, "train"), heldout)
        if not data.is_file():
            raise FileNotFoundError(
                f"{data} does not exist: point data at a file of records "
                f"({', '.join(SUPPORTED_SUFFIXES)}) or a folder holding train.jsonl"
            )
        if heldout is not None and not Path(heldout).is_file():
            raise FileNotFoundError(f"held-out file {heldout} does not exist")
        return cls(data, None if heldout is None else Path(heldout))

    def texts(self, split: str) -> list[str]:
        """The texts of `split` ("train" or "heldout")."""
        if self.heldout is not None:
            return read_texts(self.train if split == "train" else self.heldout)
        train, heldout = carve_heldout(read_texts(self.train), self.train)
        return train if split == "train" else heldout


def carve_heldout(texts: list[str], source: Path) -> tuple[list[str], list[str]]:
    """(training, held-out) texts: a record is held out when the SHA-256 of a fixed salt and
    its text falls in the lowest HELDOUT_SHARE of the hash range, or, if no record does, the
    lowest-hashing one. The rule depends on each text alone: the split does not move when
    records are added or reordered, and copies of one text land on the same side."""
    if len(texts) < 2:
        raise ValueError(
            f"{source}: {len(texts)} record; carving a held-out record out of the training "
            "file needs at least 2; add records or give a held-out file"
        )
    keys = [
        int.from_bytes(hashlib.sha256(_HELDOUT_SALT + t.encode()).digest()[:8]) / 2**64
        for t in texts
    ]
    cut = HELDOUT_SHARE if min(keys) < HELDOUT_SHARE else min(keys)
    heldout = [t for t, k in zip(texts, keys, strict=True) if k <= cut]
    train = [t for t, k in zip(texts, keys, strict=True) if k > cut]
    if not train:
        raise ValueError(
            f"{source}: every record is a copy of one text; nothing is left to train on"
        )
    return train, heldout


# Said after any data error: what a data file must look like.
DATA_HINT = (
    "  (an enterprise's data: a .jsonl, .csv or .parquet file of records, each with a 'text' "
    "field or 'instruction' and 'response' fields, or a folder with train.<ext> and optionally "
    'heldout.<ext>; README, "Bring your own data")'
)


@dataclass(frozen=True)
class DataCheck:
    train_records: int
    heldout_records: int


def check_data(files: DataFiles, tokenizer, seq_len: int) -> DataCheck:
    """Read every record of both splits (each must parse and have its fields) and check that
    the training records make at least one block of `seq_len` tokens; ValueError otherwise."""
    train, heldout = files.texts("train"), files.texts("heldout")
    tokens = 0
    for text in train:  # stop as soon as one block is full: big files check fast
        tokens += len(_leading_tokens(tokenizer, text, seq_len)) + 1
        if tokens >= seq_len:
            break
    if tokens < seq_len:
        raise ValueError(
            f"{files.train}: its {len(train)} training record(s) hold {tokens} tokens, fewer "
            f"than one block of train.seq_len={seq_len}; add records or lower train.seq_len"
        )
    return DataCheck(len(train), len(heldout))


def read_texts(path: Path) -> list[str]:
    """The texts of a file's records; each record is checked (see `record_text`)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        stat = None
    if stat is None:
        return _read_texts(path)
    return list(_read_texts_cached(path, stat.st_mtime_ns, stat.st_size))


@lru_cache(maxsize=16)
def _read_texts_cached(path: Path, mtime_ns: int, size: int) -> tuple[str, ...]:
    return tuple(_read_texts(path))


def _read_texts(path: Path) -> list[str]:
    records = read_records(path)
    if not records:
        raise ValueError(
            f"{path}: no records; a data file holds one record per line (JSONL) or row (CSV)"
        )
    # Records are numbered from 1, as an editor numbers a JSONL file's lines.
    texts = [record_text(r, f"{path} record {i}") for i, r in enumerate(records, 1)]
    for i, text in enumerate(texts, 1):
        if len(text) > MAX_RECORD_CHARS:
            raise ValueError(
                f"{path} record {i}: {len(text):,} characters; at most {MAX_RECORD_CHARS:,} per record"
            )
    return texts


def tokenize_blocks(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """[num_blocks, seq_len] token ids; the tail shorter than a block is dropped."""
    import torch

    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    num_blocks = len(ids) // seq_len
    if num_blocks == 0:
        raise ValueError(f"data too small: {len(ids)} tokens make no block of seq_len={seq_len}")
    return torch.tensor(ids[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)


# Padding in record rows. Negative so it can never be a real token: models read it as token 0
# (after the text, so causal attention never lets a real position see it) and losses skip it,
# as PyTorch's cross-entropy skips targets equal to -100 by default.
PADDING = -100


def tokenize_records(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """[num_records, seq_len] token ids, ONE record per row (text + EOS, cut at seq_len, padded with
    PADDING). Record-level DP needs this: packed blocks spread a record over two examples, so
    clipping one example would not bound that record's influence."""
    import torch

    rows = torch.full((len(texts), seq_len), PADDING, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = (_leading_tokens(tokenizer, text, seq_len) + [tokenizer.eos_token_id])[:seq_len]
        rows[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return rows


def _leading_tokens(tokenizer, text: str, count: int) -> list[int]:
    """The first `count` tokens of `text`, tokenizing only as much of it as needed (a token is
    at least one character, so a prefix of 64 characters per token is plenty)."""
    chars = 64 * count + 1024
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > count + 8 or chars >= len(text):
            return ids[:count]
        chars *= 4


def load_blocks(path: Path, tokenizer, seq_len: int) -> torch.Tensor:
    return tokenize_blocks(read_texts(path), tokenizer, seq_len)


def load_records(path: Path, tokenizer, seq_len: int) -> torch.Tensor:
    return tokenize_records(read_texts(path), tokenizer, seq_len)


def dirichlet_partition(
    labels: list[str], num_clients: int, alpha: float, seed: int = 0
) -> list[list[int]]:
    """Split record indices into `num_clients` non-IID parts: for each label value, its records are
    shared out by proportions drawn from Dirichlet(alpha). Small alpha: each client sees few labels."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for label in sorted(by_label):
        idx = np.array(by_label[label])
        rng.shuffle(idx)
        proportions = rng.dirichlet([alpha] * num_clients)
        cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(int)
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].extend(int(i) for i in chunk)
    return [sorted(p) for p in parts]
