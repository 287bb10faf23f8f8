"""Line assembly for --log and --timestamps, tested on chunk sequences without processes."""
import pytest

from supervisor.output.events import LOG_PIECE_BYTES
from supervisor.output.assemble import REDRAW_EVERY_S, LineAssembler, Stamper


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
    assert asm.next_tick_at() is None  # and not at all while it does not change
    asm.feed(b"\rstep 2.5", now=105.5)
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


def test_a_frozen_unfinished_line_comes_out_once_not_every_5s():
    """Issue 7.1: re-emitting the same bar state made --progress-regex see progress in a hang."""
    asm = LineAssembler()
    asm.feed(b"\rBatch 5/100", now=0.0)
    emitted = [flat(asm.tick(t)) for t in range(0, 60)]
    assert [e for e in emitted if e] == [[(False, b"Batch 5/100")]]
    assert asm.next_tick_at() is None


@pytest.mark.parametrize("chunks", [
    [b"%d%%\r" % i for i in range(2000)],  # print(x, end="\r", flush=True): one redraw per read
    [b"\r%d%%" % i for i in range(2000)],  # tqdm's way: the \r first
    [part for i in range(1000, 2000) for part in (b"\r%d" % (i // 10), b"%d%%" % (i % 10))],  # split mid-state
])
def test_redraws_never_pile_up_whatever_the_read_boundaries(chunks):
    """Issue 7.9: one redraw per read piled every state into one 64 KiB log line with raw \r."""
    asm = LineAssembler()
    out = []
    for i, c in enumerate(chunks):
        out += flat(asm.feed(c, now=i * 0.01))
        out += flat(asm.tick(i * 0.01))
        assert len(asm._buf) < 16
    out += flat(asm.close())
    assert all(b"\r" not in line for _, line in out)
    assert len(out) <= 1 + 2000 * 0.01 / REDRAW_EVERY_S + 1  # the states every 5 s, and the final one
    assert out[-1][1] == b"1999%"
