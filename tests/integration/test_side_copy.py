"""The tee beside the splice (output counters, SPEC 1.2): what Python sees of spliced stdout is the end
of exactly the bytes that moved, never a byte twice, whatever the terminal took."""
import os

from supervisor.output.tail import Tail
from supervisor.output.terminal import SideCopy


def pipe():
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    return r, w


def test_seen_bytes_are_the_end_of_what_moved_even_when_the_terminal_takes_part(tmp_path):
    src_r, src_w = pipe()
    term_r, term_w = pipe()
    side = SideCopy(keep=100)
    data = bytes(range(256)) * 40  # 10240 bytes
    os.write(src_w, data)
    moved_total, seen, tail = b"", [], Tail(limit=100)
    for take in (1000, 0, 5000, 10240):  # the terminal takes part, nothing, then the rest
        copied = side.copy(src_r)
        assert copied == len(data) - len(moved_total)  # what waits, copied again when not moved
        moved = os.splice(src_r, term_w, take) if take else 0
        view = side.settle(copied, moved)
        seen.append(bytes(view))
        tail.feed(view)
        moved_total += os.read(term_r, 1 << 20) if moved else b""
        if len(moved_total) == len(data):
            break
    assert moved_total == data
    assert seen[0] == data[1000 - 100:1000] and seen[1] == b""
    assert tail.value() == data[-100:]
    assert side.copy(src_r) == -1  # nothing waits
    os.close(src_w)
    assert side.copy(src_r) == 0  # end of file
    side.close()


def test_a_tty_cannot_be_teed_so_it_is_read_instead():
    master, slave = os.openpty()
    side = SideCopy(keep=100)
    try:
        assert side.copy(master) is None
    finally:
        side.close()
        os.close(master)
        os.close(slave)
