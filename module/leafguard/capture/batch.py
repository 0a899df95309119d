"""The unit of work between a frame source and the core.

A batch keeps its frames in one contiguous buffer so the core can gather header fields for many frames at once
(numpy over the buffer) and walk per frame only where state changes. Frame ``i`` is
``data[offsets[i] : offsets[i] + caplens[i]]``; ``wirelens[i]`` is its original length on the wire (what tshark
counts), which is larger than ``caplens[i]`` when the frame was cut by the snap length.
"""

from __future__ import annotations

from collections.abc import MutableSequence
from dataclasses import dataclass, field

# Link types (pcap LINKTYPE_* values) that the decoder understands.
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
SUPPORTED_LINKTYPES = frozenset(
    {LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL, LINKTYPE_IPV4, LINKTYPE_IPV6, LINKTYPE_LINUX_SLL2}
)
LINKTYPE_NAMES = {
    LINKTYPE_ETHERNET: "ethernet",
    LINKTYPE_RAW: "raw",
    LINKTYPE_LINUX_SLL: "linux_sll",
    LINKTYPE_IPV4: "ipv4",
    LINKTYPE_IPV6: "ipv6",
    LINKTYPE_LINUX_SLL2: "linux_sll2",
}


@dataclass(slots=True)
class FrameBatch:
    """Frames of one link type, in capture order."""

    linktype: int
    data: bytes
    # Lists, or array.array where a reader fills them (the core views those without a copy).
    offsets: MutableSequence[int] = field(default_factory=list)
    caplens: MutableSequence[int] = field(default_factory=list)
    wirelens: MutableSequence[int] = field(default_factory=list)
    timestamps: MutableSequence[float] = field(default_factory=list)
    source: str = ""
    file_offset: int = -1
    """Where ``data`` starts in the source file, when it is a stretch of that file (capture file readers set it,
    so that another process can read the same bytes); -1 otherwise."""
    prepared: object = None
    """What a reader process already computed for this batch (see `capture.forked`), or None."""
    found: object = None
    """What a reader process's stateful rules found in this batch (`forked.BatchRules`), or None when they did
    not run there."""

    def __len__(self) -> int:
        return len(self.offsets)

    def frame(self, i: int) -> bytes:
        off = self.offsets[i]
        return self.data[off : off + self.caplens[i]]

    @classmethod
    def from_frames(
        cls,
        linktype: int,
        frames: list[tuple[float, bytes, int]],
        source: str = "",
    ) -> FrameBatch:
        """Build a batch from ``(timestamp, captured_bytes, wire_length)`` triples (tests, live capture)."""
        parts: list[bytes] = []
        batch = cls(linktype=linktype, data=b"", source=source)
        pos = 0
        for ts, raw, wirelen in frames:
            parts.append(raw)
            batch.offsets.append(pos)
            batch.caplens.append(len(raw))
            batch.wirelens.append(wirelen)
            batch.timestamps.append(ts)
            pos += len(raw)
        batch.data = b"".join(parts)
        return batch
