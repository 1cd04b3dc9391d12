"""Receiving data-plane frames in place: the state machine both ends of a connection share.

A frame is read as a sequence of parts (the 32 header bytes, the metadata, each value), each
into the memory it belongs in. Small parts go through one staging buffer: a single receive
then carries the header and metadata of a frame, usually of several pipelined frames, and the
start of a small value, instead of one system call and one callback per part. A part too big
for the stage (a large value) is received straight into its final memory, so big values are
still never copied. Discarded bytes (a refused PUT's values, a closing connection's input)
land in the stage and are dropped.

A subclass says where each part goes (`_expect`) and handles a complete part in
`_part_received`; it may hold back the next frame (`_hold_frames`, at a frame boundary only)
while it cannot take more work, and calls `_take_staged` once it can again.
"""

from __future__ import annotations

import asyncio

from kvmesh import frames

STAGE_BYTES = 64 * 1024
# A part with at least this much left is received straight into its memory (no copy).
DIRECT_MIN_BYTES = 16 * 1024
# A staged receive asks for the current part and at most this much of what follows: enough
# for dozens of pipelined small frames, little of a big value (whose bytes it would copy).
LOOKAHEAD_BYTES = 4 * 1024
HEADER, META, VALUES, CLOSED = range(4)


class FrameReader(asyncio.BufferedProtocol):
    """Reads frames part by part; subclasses handle the parts."""

    def __init__(self) -> None:
        self._head = memoryview(bytearray(frames.HEADER_BYTES))
        self._stage = memoryview(bytearray(STAGE_BYTES))
        self._staged_from = 0  # stage[_staged_from:_staged_to]: received, not yet consumed
        self._staged_to = 0
        self._direct = False  # the last buffer handed out was the part's own memory
        self._consuming = False
        self._state = HEADER
        self._target: memoryview | None = self._head  # where the current part goes; None: discarded
        self._want = frames.HEADER_BYTES
        self._pos = 0

    # -- subclass hooks ----------------------------------------------------------------------

    def _part_received(self) -> None:
        """The current part is complete: handle it and `_expect` the next one (never an empty one).

        A handler that expects nothing more leaves the connection discarding what still arrives."""
        raise NotImplementedError

    def _hold_frames(self) -> bool:
        """True while no new frame may start (the receiver has too much work already)."""
        return False

    # -- parts -------------------------------------------------------------------------------

    def _expect(self, state: int, target: memoryview | None, size: int) -> None:
        self._state = state
        self._target = target
        self._want = size
        self._pos = 0

    def _expect_header(self) -> None:
        self._expect(HEADER, self._head, frames.HEADER_BYTES)

    def _discard_rest(self) -> None:
        """Nothing more on this stream is read as frames: what still arrives is dropped."""
        self._expect(CLOSED, None, STAGE_BYTES)

    @property
    def _mid_frame(self) -> bool:
        """Some of a frame arrived but not all of it (the stall check's "receiving")."""
        return self._state != HEADER or self._pos > 0

    # -- asyncio's buffered protocol -----------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        target = self._target
        if (
            self._staged_from == self._staged_to
            and target is not None
            and self._want - self._pos >= DIRECT_MIN_BYTES
        ):
            self._direct = True
            return target[self._pos : self._want]
        self._direct = False
        stage = self._stage
        if self._staged_from == self._staged_to:
            self._staged_from = self._staged_to = 0
        elif self._staged_to == len(stage):  # keep the unconsumed bytes, make room after them
            if self._staged_from == 0:
                self._take_staged(force=True)  # a full stage held back: cannot happen while reading is paused
            left = self._staged_to - self._staged_from
            stage[:left] = stage[self._staged_from : self._staged_to]
            self._staged_from, self._staged_to = 0, left
        wanted = self._want - self._pos - (self._staged_to - self._staged_from) + LOOKAHEAD_BYTES
        return stage[self._staged_to : self._staged_to + max(wanted, LOOKAHEAD_BYTES)]

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct:
            self._pos += nbytes
            if self._pos >= self._want:
                self._complete()
            return
        self._staged_to += nbytes
        self._take_staged()

    def _complete(self) -> None:
        self._part_received()
        if self._pos >= self._want:  # no next part (the handler gave up on the stream)
            self._discard_rest()

    def _take_staged(self, force: bool = False) -> None:
        """Hands staged bytes to the current parts, completing as many parts as they fill."""
        if self._consuming:
            return  # the loop below is running (a handler called back in): it goes on itself
        self._consuming = True
        stage = self._stage
        try:
            while self._staged_from < self._staged_to:
                if self._state == HEADER and self._pos == 0 and not force and self._hold_frames():
                    break
                take = min(self._want - self._pos, self._staged_to - self._staged_from)
                target = self._target
                if target is not None:
                    target[self._pos : self._pos + take] = stage[self._staged_from : self._staged_from + take]
                self._pos += take
                self._staged_from += take
                if self._pos >= self._want:
                    self._complete()
        finally:
            self._consuming = False
        if self._staged_from == self._staged_to:
            self._staged_from = self._staged_to = 0
