"""Line assembly for --log and --timestamps, tested on chunk sequences without processes."""
import pytest

from supervisor.events import LOG_PIECE_BYTES
from supervisor.assemble import REDRAW_EVERY_S, LineAssembler, Stamper


def flat(runs):
    """(continued, line) pairs from runs of lines."""
    return [(cont, line) for cont, lines in runs for line in lines]


def feed_all(chunks, now=0.0):
    asm = LineAssembler()
    out = []
    for c in chunks:
        out += flat(asm.feed(c, now))
    return out + flat(asm.close())


@pytest.mark.parametrize("chunks,expected", [
    ([b"a\nb\n"], [(False, b"a"), (False, b"b")]),
    ([b"hel", b"lo\nwor", b"ld\n"], [(False, b"hello"), (False, b"world")]),
    ([b"no newline at end"], [(False, b"no newline at end")]),
    ([b"crlf\r\n"], [(False, b"crlf")]),
    ([b"\r10%", b"\r50%", b"\r100%\n"], [(False, b"100%")]),  # a bar: only its final state
    ([b"\r10%\r20%\n\r5%", b"\r9%\n"], [(False, b"20%"), (False, b"9%")]),
    ([b"\xff\x00bin\n"], [(False, b"\xff\x00bin")]),
    ([b"\n\n"], [(False, b""), (False, b"")]),
])
def test_lines_from_chunks(chunks, expected):
    assert feed_all(chunks) == expected


def test_long_line_is_split_into_marked_pieces_with_bounded_buffer():
    asm = LineAssembler()
    out = []
    chunk = b"x" * (1 << 20)
    for _ in range(5):  # a 5 MiB line arriving in 1 MiB chunks
        out += flat(asm.feed(chunk, 0.0))
        assert len(asm._buf) <= LOG_PIECE_BYTES
    out += flat(asm.feed(b"y\nnext\n", 0.0))
    pieces = out[:-1]
    assert all(len(t) <= LOG_PIECE_BYTES for _, t in pieces)
    assert b"".join(t for _, t in pieces) == b"x" * (5 << 20) + b"y"
    assert pieces[0][0] is False and all(cont for cont, _ in pieces[1:])
    assert out[-1] == (False, b"next")


def test_long_line_in_one_chunk_is_split_too():
    out = feed_all([b"z" * (LOG_PIECE_BYTES * 2 + 5) + b"\n"])
    assert [len(t) for _, t in out] == [LOG_PIECE_BYTES, LOG_PIECE_BYTES, 5]
    assert [c for c, _ in out] == [False, True, True]


def test_pending_line_shows_latest_state_at_most_every_5s_then_final_state():
    asm = LineAssembler()
    assert asm.feed(b"\rstep 1", now=100.0) == []
    assert asm.tick(100.0 + REDRAW_EVERY_S - 0.1) == []
    asm.feed(b"\rstep 2", now=103.0)
    assert flat(asm.tick(100.0 + REDRAW_EVERY_S)) == [(False, b"step 2")]
    assert asm.tick(100.0 + REDRAW_EVERY_S + 1) == []  # not again until another 5 s
    assert asm.next_tick_at() == 100.0 + 2 * REDRAW_EVERY_S
    assert flat(asm.feed(b"\rstep 3 done\n", now=106.0)) == [(False, b"step 3 done")]
    assert asm.next_tick_at() is None


def test_bar_redraws_keep_memory_flat():
    asm = LineAssembler()
    for i in range(10000):
        asm.feed(b"\r" + b"#" * 100 + b" %d" % i, 0.0)
    assert len(asm._buf) < 200


def test_stamper_prefixes_every_line_start_across_chunks():
    s = Stamper()
    p = b"T "
    assert s.stamp(b"a\nb", p) + s.stamp(b"c\n", p) + s.stamp(b"\nd\n", p) == b"T a\nT bc\nT \nT d\n"
