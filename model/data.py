"""An enterprise's local text data: reading, tokenizing into fixed-length blocks, batching, splitting.

Accepted files: JSONL or CSV with either a `text` column or `instruction` + `response` columns;
Parquet when pyarrow is installed. Records are tokenized, joined with EOS and cut into blocks of
`seq_len` tokens, so no padding is needed and every example (block) has the same length. torch is
imported where tensors are made: checking a run config reads records without it.
"""

from __future__ import annotations

import csv
import json
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
    raise FileNotFoundError(f"no {split}{{{','.join(SUPPORTED_SUFFIXES)}}} in {directory}")


def read_texts(path: Path) -> list[str]:
    records = read_records(path)
    if not records:
        raise ValueError(f"{path}: no records")
    texts = [record_text(r, f"{path} record {i}") for i, r in enumerate(records)]
    for i, text in enumerate(texts):
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


def load_blocks(path: Path, tokenizer, seq_len: int) -> torch.Tensor:
    return tokenize_blocks(read_texts(path), tokenizer, seq_len)


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
