"""The bounded tail of a stream (SPEC 4, `cause`): the last bytes, never more, in any chunking."""
import pytest

from supervisor.output.tail import TAIL_BYTES, Tail


@pytest.mark.parametrize("chunk", [1, 7, 1000, TAIL_BYTES - 1, TAIL_BYTES, TAIL_BYTES + 3, 5 * TAIL_BYTES])
def test_the_last_bytes_whatever_the_chunks(chunk):
    data = bytes(range(256)) * (12 * TAIL_BYTES // 256 + 1)  # 12+ times the limit
    tail = Tail()
    for at in range(0, len(data), chunk):
        tail.feed(memoryview(data)[at:at + chunk])
        assert len(tail._buf) <= 2 * TAIL_BYTES
    assert tail.value() == data[-TAIL_BYTES:]


def test_less_than_the_limit_is_kept_whole():
    tail = Tail(limit=10)
    tail.feed(b"abc")
    tail.feed(b"de")
    assert tail.value() == b"abcde"
    tail.feed(b"fghijklmn")
    assert tail.value() == b"efghijklmn"
