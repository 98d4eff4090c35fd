"""What a store transaction is made of and what reads, transactions and watches return:
compares, ops, decoded entries and their etcd bookkeeping. Pure values, with the etcd
messages they become; the store (`accessline_server.runtime.store`) sends them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, NamedTuple, TypeVar

import aetcd.rpc as etcdrpc
import grpc
from google.protobuf.message import DecodeError, Message

from accessline_server.runtime.errors import AccesslineError

M = TypeVar("M", bound=Message)
T = TypeVar("T")


class CorruptValue(AccesslineError):
    """A stored value does not parse as the expected message."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "CORRUPT_VALUE"


@dataclass(frozen=True)
class KeyMeta:
    """etcd's bookkeeping of a key. `create_revision` is the fencing token of
    anything held under a lease."""

    create_revision: int
    mod_revision: int
    version: int
    lease: int


class RawKV(NamedTuple):
    """A key as a transaction's `get` op found it, not decoded (`decode` does that)."""

    key: str
    value: bytes
    meta: KeyMeta


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A decoded key and value. `key` is relative to the store's prefix."""

    key: str
    value: T
    meta: KeyMeta


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction."""

    key: str
    target: str
    op: str
    operand: int | bytes

    @staticmethod
    def absent(key: str) -> Compare:
        """The key does not exist."""
        return Compare(key, "create", "==", 0)

    @staticmethod
    def exists(key: str) -> Compare:
        """The key exists."""
        return Compare(key, "create", ">", 0)

    @staticmethod
    def created_at(key: str, revision: int) -> Compare:
        """The key still exists with this create revision (a fencing token)."""
        return Compare(key, "create", "==", revision)

    @staticmethod
    def modified_at(key: str, revision: int) -> Compare:
        """The key was last modified at this revision (optimistic concurrency)."""
        return Compare(key, "mod", "==", revision)

    @staticmethod
    def written_fewer_than(key: str, times: int) -> Compare:
        """The key was written fewer than `times` times since it was created (its
        version; an absent key has version 0): a counter whose check and count are one
        transaction, with no conflict between concurrent counts below the limit."""
        return Compare(key, "version", "<", times)


@dataclass(frozen=True)
class Op:
    """One operation of a transaction."""

    kind: str
    key: str
    value: bytes = b""
    lease: int = 0
    prefix: bool = False
    keep_value: bool = False

    @staticmethod
    def put(key: str, value: Message | bytes, lease: int = 0) -> Op:
        data = value if isinstance(value, bytes) else value.SerializeToString()
        return Op("put", key, data, lease)

    @staticmethod
    def relet(key: str, lease: int) -> Op:
        """Moves an existing key to another lease, its value unchanged (the transaction
        fails with an error if the key does not exist: compare it first)."""
        return Op("put", key, b"", lease, keep_value=True)

    @staticmethod
    def delete(key: str) -> Op:
        return Op("delete", key)

    @staticmethod
    def delete_prefix(prefix: str) -> Op:
        return Op("delete", prefix, prefix=True)

    @staticmethod
    def get(key: str) -> Op:
        return Op("get", key)

    @staticmethod
    def get_prefix(prefix: str) -> Op:
        return Op("get", prefix, prefix=True)


@dataclass(frozen=True)
class TxnResult:
    """Whether the compares held, the store revision after the transaction, and for
    each `get` op the raw keys it found."""

    succeeded: bool
    revision: int
    gets: list[list[RawKV]]
    deleted: list[int]

    def first(self, index: int = 0) -> RawKV | None:
        """The first key the `index`-th get op found (in the ops that ran), or None."""
        if index >= len(self.gets) or not self.gets[index]:
            return None
        return self.gets[index][0]


class EventKind(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    """One change seen by a watch. `value` is empty for a delete; `prev_value` is the
    value before the change when etcd still had it."""

    kind: EventKind
    key: str
    value: bytes
    meta: KeyMeta
    prev_value: bytes | None

    @property
    def revision(self) -> int:
        return self.meta.mod_revision

    def decode(self, message_type: type[M]) -> M:
        return decode(message_type, self.key, self.value)

    def decode_prev(self, message_type: type[M]) -> M | None:
        if self.prev_value is None:
            return None
        return decode(message_type, self.key, self.prev_value)


def decode(message_type: type[M], key: str, data: bytes) -> M:
    """Decodes a stored value (a transaction's raw `get`, a watch event)."""
    message = message_type()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise CorruptValue(f"value of {key} is not a {message_type.__name__}") from exc
    return message


def key_meta(kv: Any) -> KeyMeta:
    """The bookkeeping of an etcd KeyValue."""
    return KeyMeta(kv.create_revision, kv.mod_revision, kv.version, kv.lease)


def prefix_range_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with `prefix`."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def compare_message(compare: Compare, key: bytes) -> Any:
    """The etcd Compare of `compare`, on the absolute key `key`."""
    message = etcdrpc.Compare(key=key)
    message.result = {
        "==": etcdrpc.Compare.EQUAL,
        "!=": etcdrpc.Compare.NOT_EQUAL,
        "<": etcdrpc.Compare.LESS,
        ">": etcdrpc.Compare.GREATER,
    }[compare.op]
    if compare.target == "create":
        message.target = etcdrpc.Compare.CREATE
        message.create_revision = int(compare.operand)
    elif compare.target == "mod":
        message.target = etcdrpc.Compare.MOD
        message.mod_revision = int(compare.operand)
    elif compare.target == "version":
        message.target = etcdrpc.Compare.VERSION
        message.version = int(compare.operand)
    else:
        raise ValueError(f"unknown compare target {compare.target}")
    return message


def op_message(op: Op, key: bytes) -> Any:
    """The etcd RequestOp of `op`, on the absolute key `key`."""
    if op.kind == "put":
        return etcdrpc.RequestOp(
            request_put=etcdrpc.PutRequest(
                key=key, value=op.value, lease=op.lease, ignore_value=op.keep_value
            )
        )
    if op.kind == "delete":
        end = prefix_range_end(key) if op.prefix else b""
        return etcdrpc.RequestOp(
            request_delete_range=etcdrpc.DeleteRangeRequest(key=key, range_end=end)
        )
    if op.kind == "get":
        end = prefix_range_end(key) if op.prefix else b""
        return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key, range_end=end))
    raise ValueError(f"unknown op {op.kind}")
