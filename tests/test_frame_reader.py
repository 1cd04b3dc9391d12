"""The shared frame reader: whatever the receive sizes, every part lands whole, in order, in its memory."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh import frames
from kvmesh.runtime.frame_reader import CLOSED, DIRECT_MIN_BYTES, HEADER, META, VALUES, FrameReader


class Recorder(FrameReader):
    """Reads GET-response-shaped frames: header, metadata, then one value per length."""

    def __init__(self) -> None:
        super().__init__()
        self.got: list[tuple[int, bytes, list[bytes]]] = []
        self.held = False
        self.direct_bytes = 0  # bytes received straight into a value's memory
        self.receives = 0
        self._meta = b""
        self._values: list[bytearray] = []
        self._index = 0
        self._request_id = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        self.receives += 1
        return super().get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct:
            self.direct_bytes += nbytes
        super().buffer_updated(nbytes)

    def _hold_frames(self) -> bool:
        return self.held

    def _part_received(self) -> None:
        if self._state == HEADER:
            header = frames.decode_header(self._head)
            self._request_id = header.request_id
            if header.meta_len:
                self._expect(META, memoryview(bytearray(header.meta_len)), header.meta_len)
            else:
                self._start_values(b"")
        elif self._state == META:
            assert self._target is not None
            self._start_values(bytes(self._target))
        else:
            self._index += 1
            self._next_value()

    def _start_values(self, meta: bytes) -> None:
        self._meta = meta
        self._values = [bytearray(n) for n in frames.decode_lengths(len(meta) // 8, meta)]
        self._index = 0
        self._next_value()

    def _next_value(self) -> None:
        while self._index < len(self._values) and not self._values[self._index]:
            self._index += 1
        if self._index < len(self._values):
            value = self._values[self._index]
            self._expect(VALUES, memoryview(value), len(value))
            return
        self.got.append((self._request_id, self._meta, [bytes(v) for v in self._values]))
        self._expect_header()

    def feed(self, data: bytes, sizes: list[int]) -> None:
        """Delivers `data` as asyncio would, each receive at most the next of `sizes` bytes."""
        pos, turn = 0, 0
        while pos < len(data):
            buffer = self.get_buffer(-1)
            assert len(buffer) > 0
            n = min(len(buffer), sizes[turn % len(sizes)], len(data) - pos)
            turn += 1
            buffer[:n] = data[pos : pos + n]
            pos += n
            self.buffer_updated(n)


def response(request_id: int, values: list[bytes]) -> bytes:
    return frames.encode_lengths(request_id, [len(v) for v in values]) + b"".join(values)


value_sizes = st.sampled_from([0, 1, 40, 4000, DIRECT_MIN_BYTES - 1, DIRECT_MIN_BYTES, 70_000, 200_000])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(value_sizes, max_size=4), min_size=1, max_size=8),
    st.lists(st.integers(1, 300_000), min_size=1, max_size=6),
)
def test_every_part_lands_whole_whatever_the_receive_sizes(shapes: list[list[int]], sizes: list[int]) -> None:
    sent = [(i + 1, [os.urandom(n) for n in shape]) for i, shape in enumerate(shapes)]
    reader = Recorder()
    reader.feed(b"".join(response(rid, values) for rid, values in sent), sizes)
    assert [(rid, values) for rid, _, values in reader.got] == sent


def test_big_values_skip_the_stage_and_small_frames_share_one_receive() -> None:
    big = os.urandom(1 << 20)
    reader = Recorder()
    reader.feed(response(1, [big]), [1 << 22])
    assert reader.got[0][2] == [big]
    assert reader.direct_bytes >= len(big) - 8 * 1024  # at most the lookahead was copied through the stage

    small = b"".join(response(i, [b"x" * 10]) for i in range(1, 41))
    reader = Recorder()
    reader.feed(small, [1 << 20])
    assert len(reader.got) == 40 and reader.receives == 1  # 40 pipelined frames, one receive


def test_held_frames_wait_in_the_stage_until_taken() -> None:
    reader = Recorder()
    data = response(1, [b"a"]) + response(2, [b"b"]) + response(3, [b"c"])
    reader.held = True
    reader.feed(data, [len(data)])
    assert reader.got == []  # nothing starts while held, and nothing is lost
    reader.held = False
    reader._take_staged()
    assert [rid for rid, _, _ in reader.got] == [1, 2, 3]


class GivesUp(Recorder):
    """A handler that finds the stream broken and expects nothing more."""

    def _part_received(self) -> None:
        self.got.append((0, b"", []))


def test_a_handler_that_expects_nothing_more_leaves_the_rest_discarded() -> None:
    reader = GivesUp()
    data = response(1, [b"a"]) * 50
    reader.feed(data, [len(data)])  # returns: no endless loop over the staged bytes
    assert len(reader.got) == 1 and reader._state == CLOSED
    reader.feed(b"more" * 1000, [4096])
    assert len(reader.got) == 1
