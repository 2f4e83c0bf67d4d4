"""The wire contract between ServerApp and ClientApp: message payload keys and record conversions.

A TRAIN message carries ``ARRAYS`` (the global adapter state as an ``ArrayRecord``) and ``ROUND`` (a
``ConfigRecord``: global version and the round's hyper-parameters). A reply carries ``UPDATE`` (a
``ConfigRecord``: the base version it was trained from and the codec-encoded adapter delta) and ``METRICS``
(a ``MetricRecord``). An EVALUATE message carries ``ARRAYS`` and ``ROUND``; its reply ``METRICS``.
A QUERY message carries ``INFO`` (an empty ``ConfigRecord``); its reply ``METRICS`` with ``PARTITION_ID``
(-1 outside a simulation): the server learns which simulated device a node is before it dispatches work.
No bare key strings elsewhere: import these constants.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

__all__ = [
    "ACCURACY",
    "ACC_PREFIX",
    "ARRAYS",
    "BASE_MODEL",
    "BASE_VERSION",
    "BATCH_SIZE",
    "COUNT_PREFIX",
    "DELTA",
    "DOWNLOAD_BYTES",
    "DP_EPSILON",
    "DP_NOISE_STD",
    "INFO",
    "LOCAL_EPOCHS",
    "LOCAL_STEPS",
    "LOSS",
    "LR",
    "METRICS",
    "NUM_EXAMPLES",
    "OP_KEYS",
    "OP_REGISTER",
    "OP_UNMASK",
    "PARTITION_ID",
    "RAW_BYTES",
    "ROUND",
    "SA_B_SHARES",
    "SA_CLIP",
    "SA_COMMIT",
    "SA_C_PK",
    "SA_C_PKS",
    "SA_DROPPED",
    "SA_GROUP",
    "SA_INDEX",
    "SA_K",
    "SA_LEVELS",
    "SA_N",
    "SA_NORM_CAP",
    "SA_OP",
    "SA_SEALED",
    "SA_SEALED_B",
    "SA_SEALED_S",
    "SA_SENDERS",
    "SA_S_PK",
    "SA_S_PKS",
    "SA_S_SHARES",
    "SA_T",
    "SECAGG",
    "SEED",
    "TRAIN_SECONDS",
    "TRAIN_STEPS",
    "UPDATE",
    "UPLOAD_BYTES",
    "VERSION",
    "adapters_to_record",
    "query_message_content",
    "record_to_adapters",
    "round_record",
    "train_message_content",
    "update_content",
]

# record names in a message's RecordDict
ARRAYS = "adapters"
ROUND = "round"
UPDATE = "update"
METRICS = "metrics"
INFO = "info"

# keys inside ROUND
VERSION = "version"
LR = "lr"
LOCAL_STEPS = "local-steps"
LOCAL_EPOCHS = "local-epochs"  # > 0: passes over the device's data (local-steps is then a floor)
BATCH_SIZE = "batch-size"
SEED = "seed"
BASE_MODEL = "base-model"  # the published base (model store version) of this version ("" = model.base_path)

# keys inside UPDATE
BASE_VERSION = "base-version"
DELTA = "delta"  # bytes: fedge.common.codec payload

# keys inside METRICS
NUM_EXAMPLES = "num-examples"
LOSS = "loss"
ACCURACY = "accuracy"
TRAIN_SECONDS = "train-seconds"
TRAIN_STEPS = "train-steps"  # optimizer steps the device took (local epochs make it depend on its data)
UPLOAD_BYTES = "upload-bytes"
RAW_BYTES = "raw-bytes"
PARTITION_ID = "partition-id"  # the simulated device's partition: the server's virtual clock derives its profile
COUNT_PREFIX = "count-"  # count-image, count-audio: samples with that modality
ACC_PREFIX = "acc-"  # acc-image, acc-audio, acc-image+audio: accuracy per modality subset
DOWNLOAD_BYTES = "download-bytes"  # bytes of the TRAIN message's adapter record the device received
DP_NOISE_STD = "dp-noise-std"  # std of the Gaussian noise the device added per coordinate (0 = no DP)
DP_EPSILON = "dp-epsilon"  # the device's cumulative epsilon at dp.delta over all updates it has sent

# secure aggregation (fedge.common.secagg, docs/secure_aggregation.md): a SECAGG ConfigRecord rides in QUERY and
# TRAIN messages of a secure run and in their replies; QUERY's SA_OP says which step it is
SECAGG = "secagg"
SA_OP = "op"
OP_REGISTER = "register"  # -> SA_C_PK: the node's long-term share-encryption key
OP_KEYS = "keys"  # SA_GROUP, SA_INDEX, SA_C_PKS, SA_T -> SA_S_PK, SA_SEALED (one per member), SA_COMMIT
OP_UNMASK = "unmask"  # + SA_SENDERS, SA_DROPPED, SA_SEALED_B, SA_SEALED_S -> SA_B_SHARES, SA_S_SHARES
SA_GROUP = "group"
SA_INDEX = "index"
SA_C_PK = "c-pk"
SA_C_PKS = "c-pks"
SA_S_PK = "s-pk"
SA_S_PKS = "s-pks"
SA_T = "t"
SA_N = "n"
SA_K = "k"
SA_CLIP = "clip"
SA_LEVELS = "levels"  # quantisation levels per side (the ring's width follows from it and the group size)
SA_NORM_CAP = "norm-cap"  # float > 0: members also send their update norm, masked, in [0, cap]
SA_SEALED = "sealed"
SA_COMMIT = "commit"
SA_SENDERS = "senders"
SA_DROPPED = "dropped"
SA_SEALED_B = "sealed-b"  # aligned with SA_SENDERS
SA_SEALED_S = "sealed-s"  # aligned with SA_DROPPED
SA_B_SHARES = "b-shares"
SA_S_SHARES = "s-shares"


def adapters_to_record(state: Mapping[str, object]) -> ArrayRecord:
    """Adapter state (torch tensors or NumPy arrays) -> ArrayRecord, keys sorted."""
    arrays = {k: np.ascontiguousarray(np.asarray(_to_numpy(v), dtype=np.float32)) for k, v in state.items()}
    return ArrayRecord({k: Array(arrays[k]) for k in sorted(arrays)})


def record_to_adapters(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> name -> float32 array."""
    return {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in record.items()}


def _to_numpy(v: object) -> np.ndarray:
    if hasattr(v, "detach"):
        return v.detach().cpu().float().numpy()  # type: ignore[no-any-return, attr-defined]
    return np.asarray(v)


def round_record(
    *, version: int, lr: float, local_steps: int, batch_size: int, seed: int, base_model: str = "",
    local_epochs: float = 0.0,
) -> ConfigRecord:
    """The per-round config that travels inside each message (Flower's third config scope).

    ``base_model``: the published base the version's adapters belong to, a model store version that devices
    fetch from the shard server ("" = ``model.base_path``, or the seed's init).
    """
    return ConfigRecord(
        {VERSION: int(version), LR: float(lr), LOCAL_STEPS: int(local_steps), BATCH_SIZE: int(batch_size),
         SEED: int(seed), BASE_MODEL: str(base_model), LOCAL_EPOCHS: float(local_epochs)}
    )


def query_message_content() -> RecordDict:
    """Content of a QUERY message (what a node is; see :data:`PARTITION_ID`)."""
    return RecordDict({INFO: ConfigRecord({})})


def train_message_content(adapters: Mapping[str, object], rnd: ConfigRecord) -> RecordDict:
    """Content of a TRAIN (or EVALUATE) message."""
    return RecordDict({ARRAYS: adapters_to_record(adapters), ROUND: rnd})


def update_content(*, base_version: int, payload: bytes, metrics: Mapping[str, float]) -> RecordDict:
    """Content of a TRAIN reply: the codec payload, its base version and the metrics."""
    return RecordDict(
        {
            UPDATE: ConfigRecord({BASE_VERSION: int(base_version), DELTA: payload}),
            METRICS: MetricRecord({k: float(v) for k, v in metrics.items()}),
        }
    )
