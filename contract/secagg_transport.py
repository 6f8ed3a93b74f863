"""How a node's SecAgg+ masked vector travels: in an ArrayRecord, 4 bytes an element.

Flower 1.42's SecAgg+ mod puts a node's masked vector into its reply's ConfigRecord as int64
`np.save` bytes. A record is one object on the wire, which protobuf caps at 2 GiB (about 268M
elements), and int64 is twice a plain fp32 update's bytes, though every element is already
reduced below the coordinator's 2^32 modulus. The node moves the vector into an ArrayRecord
(`pack`), as uint32 where every element fits, which Flower sends in chunks of 5 MB like any
adapter; the coordinator's grid puts it back where and how Flower's workflow reads it (`unpack`).
Flower's sums, unmasking and dropout handling are unchanged; the values are the same.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

MASKED = "fedmoe.secagg-masked-vector"
WORD = 1 << 32


def pack(content: RecordDict) -> None:
    """On the node: move a SecAgg+ reply's masked vector into an ArrayRecord (no-op otherwise)."""
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or Key.MASKED_PARAMETERS not in configs:
        return
    arrays = [bytes_to_ndarray(b) for b in configs.pop(Key.MASKED_PARAMETERS)]
    content.array_records[MASKED] = ArrayRecord([_narrow(a) for a in arrays])


def unpack(content: RecordDict) -> None:
    """On the coordinator: put a packed masked vector back as Flower's workflow reads it (a reply
    without SecAgg+ configs is left as it came, for Flower's workflow to fail on)."""
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or MASKED not in content.array_records:
        return
    arrays = content.array_records.pop(MASKED).to_numpy_ndarrays()
    wide = [a.astype(np.int64) if a.dtype == np.uint32 else a for a in arrays]
    configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in wide]


def _narrow(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.int64 and array.size and array.min() >= 0 and array.max() < WORD:
        return array.astype(np.uint32)
    return array
