"""Partial updates with versions, the same way for every resource a client changes
(AIP-134, AIP-154): the fields named by an update mask are taken from the request and
the others keep their stored values, and an etag read with the resource makes the
update apply only to that version of it."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TypeVar

from google.protobuf.descriptor import Descriptor
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from accessline_server.runtime.errors import Aborted
from accessline_server.runtime.store import Compare, Op, Store
from accessline_server.runtime.validation import Violations

M = TypeVar("M", bound=Message)


def etag(revision: int) -> str:
    """A resource's version as answered: the etcd revision that last wrote it, opaque."""
    return f"v{revision:x}"


def with_etag(message: M, revision: int) -> M:
    """A copy of `message` (which has an `etag` field) carrying its version."""
    answered = type(message)()
    answered.CopyFrom(message)
    answered.etag = etag(revision)  # type: ignore[attr-defined]
    return answered


def updatable(descriptor: Descriptor, fixed: Collection[str]) -> frozenset[str]:
    """The fields a mask may name: all but the `fixed` ones (the id, the etag)."""
    return frozenset(name for name in descriptor.fields_by_name if name not in fixed)


def check_mask(
    paths: Sequence[str], descriptor: Descriptor, allowed: frozenset[str], v: Violations
) -> None:
    """Each path names a field that may change (`*`: all of them)."""
    if len(paths) > len(allowed) + 1:
        v.add("update_mask.paths", f"must have at most {len(allowed) + 1} entries")
    for i, path in enumerate(paths[: len(allowed) + 1]):
        top = path.split(".", 1)[0]
        if path != "*" and (
            top not in allowed or not FieldMask(paths=[path]).IsValidForDescriptor(descriptor)
        ):
            v.add(f"update_mask.paths[{i}]", f"{path!r} is not a field that can be changed")


def check_etag(given: str, revision: int, what: str, metadata: Mapping[str, str]) -> None:
    """ABORTED `ETAG_MISMATCH` when an etag was given and the resource changed since."""
    if given and given != etag(revision):
        raise Aborted(
            f"{what} changed since it was read; read it again",
            reason="ETAG_MISMATCH",
            metadata=dict(metadata),
        )


def merged(current: M, given: M, paths: Sequence[str]) -> M:
    """`current` with the fields of `paths` taken from `given` (the whole of `given`
    when `paths` is empty or holds `*`); its etag cleared."""
    out = type(current)()
    if not paths or "*" in paths:
        out.CopyFrom(given)
    else:
        out.CopyFrom(current)
        FieldMask(paths=list(paths)).MergeMessage(
            given, out, replace_message_field=True, replace_repeated_field=True
        )
    out.ClearField("etag")
    return out


def check_given(
    check: Callable[[M, Violations], None],
    given: M,
    paths: Sequence[str],
    prefix: str,
    v: Violations,
    always: Collection[str],
) -> None:
    """The violations `check` finds in the request's resource, on the fields the mask
    names (all of them without a mask) and the `always` ones (its id): a field the mask
    leaves alone keeps its stored value, whatever the request holds."""
    found = Violations()
    check(given, found)
    whole = not paths or "*" in paths
    tops = {p.split(".", 1)[0] for p in paths} | set(always)
    for item in found.items:
        top = item.field.removeprefix(prefix + ".").split(".", 1)[0].split("[", 1)[0]
        if whole or top in tops:
            v.items.append(item)


def check_whole(check: Callable[[M, Violations], None], resource: M) -> None:
    """INVALID_ARGUMENT when the resource as it would be stored is not valid."""
    v = Violations()
    check(resource, v)
    v.raise_if_any()


async def put_if_unchanged(store: Store, key: str, revision: int, value: Message, what: str) -> int:
    """Writes `value` at `key` if it is still at `revision` (as read); its new revision.
    ABORTED `CONCURRENT_UPDATE` when another writer came first."""
    result = await store.txn([Compare.modified_at(key, revision)], [Op.put(key, value)])
    if not result.succeeded:
        raise Aborted(
            f"{what} changed while it was being updated; retry", reason="CONCURRENT_UPDATE"
        )
    return result.revision
