"""Progress files on a real filesystem: changes seen, leftovers ignored, any content survived."""

import os

import pytest

from supervisor.watch import progress_files
from supervisor.watch.progress_files import ProgressFiles, expand_pattern, read_first_line


def write(path, data=b"Epoch 1/10 - Batch 1/5\nepoch: 1\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def bump_mtime(path):
    """Move the mtime forward by a second: a change without waiting for the clock."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


# expand_pattern -------------------------------------------------------------

def test_glob_returns_sorted_matches(tmp_path):
    for rank in (2, 0, 1):
        write(tmp_path / f"P-rank{rank}.txt")
    write(tmp_path / "other.txt")
    assert expand_pattern(str(tmp_path / "P-rank*.txt")) == [str(tmp_path / f"P-rank{r}.txt") for r in (0, 1, 2)]


def test_glob_without_matches_is_empty(tmp_path):
    assert expand_pattern(str(tmp_path / "P-*.txt")) == []


def test_plain_path_is_kept_even_when_missing(tmp_path):
    assert expand_pattern(str(tmp_path / "PROGRESS.txt")) == [str(tmp_path / "PROGRESS.txt")]


def test_plain_path_adds_the_per_rank_files_beside_it(tmp_path):
    write(tmp_path / "PROGRESS-rank1.txt")
    write(tmp_path / "PROGRESS-rank0.txt")
    write(tmp_path / "PROGRESS-other.txt")
    write(tmp_path / "PROGRESS-rank0.log")
    assert expand_pattern(str(tmp_path / "PROGRESS.txt")) == [
        str(tmp_path / "PROGRESS.txt"),
        str(tmp_path / "PROGRESS-rank0.txt"),
        str(tmp_path / "PROGRESS-rank1.txt"),
    ]


def test_glob_characters_make_a_pattern_but_a_literal_name_still_counts(tmp_path):
    literal = write(tmp_path / "run[1]" / "P.txt")
    assert expand_pattern(str(tmp_path / "run[1]" / "P.txt")) == [literal]
    write(tmp_path / "run1" / "P.txt")
    assert expand_pattern(str(tmp_path / "run[1]" / "P.txt")) == sorted([literal, str(tmp_path / "run1" / "P.txt")])


def test_relative_plain_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "PROGRESS-rank0.txt")
    assert expand_pattern("PROGRESS.txt") == ["PROGRESS.txt", "PROGRESS-rank0.txt"]


# poll -------------------------------------------------------------------------

def test_leftover_file_is_not_progress_until_it_changes(tmp_path):
    path = write(tmp_path / "PROGRESS.txt", b"old run\n")
    files = ProgressFiles(path)
    files.baseline()
    assert files.poll() == []
    assert files.first_line() is None  # the old run's line is not this run's progress
    bump_mtime(path)
    assert files.poll() == [path]
    assert files.first_line() == "old run"
    assert files.poll() == []


def test_new_file_is_progress(tmp_path):
    files = ProgressFiles(str(tmp_path / "PROGRESS.txt"))
    files.baseline()
    assert files.poll() == []
    path = write(tmp_path / "PROGRESS.txt")
    assert files.poll() == [path]


@pytest.mark.parametrize("change", ["mtime", "size", "inode"])
def test_each_part_of_the_signature_is_a_change(tmp_path, change):
    path = write(tmp_path / "P.txt", b"Epoch 1\n")
    files = ProgressFiles(path)
    files.baseline()
    st = os.stat(path)
    if change == "mtime":
        bump_mtime(path)
    elif change == "size":
        write(tmp_path / "P.txt", b"Epoch 10\n")
    else:
        # An atomic replace with the same size and mtime: only the inode tells.
        write(tmp_path / "P.tmp", b"Epoch 2\n")
        os.utime(tmp_path / "P.tmp", ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp_path / "P.tmp", path)
        assert os.stat(path).st_ino != st.st_ino
    assert files.poll() == [path]
    files.poll()
    assert files.poll() == []


def test_per_rank_files_are_tracked_and_the_latest_is_shown(tmp_path):
    files = ProgressFiles(str(tmp_path / "P-rank*.txt"))
    files.baseline()
    rank0 = write(tmp_path / "P-rank0.txt", b"rank 0 step 1\n")
    rank1 = write(tmp_path / "P-rank1.txt", b"rank 1 step 1\n")
    bump_mtime(rank1)
    assert sorted(files.poll()) == [rank0, rank1]
    assert files.first_line() == "rank 1 step 1"  # newest mtime among those that changed
    write(tmp_path / "P-rank0.txt", b"rank 0 step 22\n")
    assert files.poll() == [rank0]
    assert files.latest == rank0
    assert files.first_line() == "rank 0 step 22"


def test_baseline_forgets_the_latest_change(tmp_path):
    path = write(tmp_path / "P.txt")
    files = ProgressFiles(path)
    files.baseline()
    bump_mtime(path)
    files.poll()
    files.baseline()  # a relaunch: the last attempt's line is not the new attempt's
    assert files.first_line() is None


def test_only_regular_files_count(tmp_path):
    (tmp_path / "P-dir.txt").mkdir()
    os.symlink(tmp_path / "missing", tmp_path / "P-dangling.txt")
    os.mkfifo(tmp_path / "P-fifo.txt")
    real = write(tmp_path / "real")
    os.symlink(real, tmp_path / "P-link.txt")
    files = ProgressFiles(str(tmp_path / "P-*.txt"))
    assert files.poll() == [str(tmp_path / "P-link.txt")]  # a link to a regular file counts


def test_deleted_and_replaced_by_directory_never_raise(tmp_path):
    path = write(tmp_path / "P.txt")
    files = ProgressFiles(path)
    files.baseline()
    bump_mtime(path)
    assert files.poll() == [path]
    os.remove(path)
    assert files.poll() == []
    assert files.first_line() is None
    os.mkdir(path)
    assert files.poll() == []
    assert files.first_line() is None
    os.rmdir(path)
    write(tmp_path / "P.txt", b"back\n")
    assert files.poll() == [path]  # it reappeared: progress
    assert files.first_line() == "back"


def test_permission_error_on_stat_is_no_change(tmp_path, monkeypatch):
    path = write(tmp_path / "P.txt")
    real_stat = os.stat

    def denied(p, *args, **kwargs):
        if os.fspath(p) == path:
            raise PermissionError(13, "Permission denied", p)
        return real_stat(p, *args, **kwargs)

    files = ProgressFiles(path)
    files.baseline()
    bump_mtime(path)
    monkeypatch.setattr(progress_files.os, "stat", denied)
    assert files.poll() == []
    assert files.first_line() is None


# first line -------------------------------------------------------------------

@pytest.mark.parametrize("data,expected", [
    (b"Epoch 3/100 - Batch 120/400 - Loss: 0.4321\nepoch: 3\n", "Epoch 3/100 - Batch 120/400 - Loss: 0.4321"),
    (b"", None),
    (b"\n\nsecond line\n", None),
    (b"   \t \n", None),
    (b"half-written, no newl", "half-written, no newl"),
    (b"  padded  \r\n", "padded"),
    (b"\x1b[31mred\x1b[0m\x00\x07 bell\n", "[31mred[0m bell"),
    (b"tab\tseparated\n", "tab separated"),
    (b"bad \xff\xfe utf-8\n", "bad \ufffd\ufffd utf-8"),
    (b"\xef\xbb\xbfwith BOM\n", "with BOM"),
    ("caf\u00e9 \u2713\n".encode(), "caf\u00e9 \u2713"),
    (b"x" * 200 + b"\n", "x" * 200),
    (b"x" * 201 + b"\n", "x" * 199 + "\u2026"),
    (b"y" * 10_000, "y" * 199 + "\u2026"),  # longer than the bounded read
])
def test_first_line_content(tmp_path, data, expected):
    assert read_first_line(write(tmp_path / "P.txt", data)) == expected


def test_binary_garbage_gives_printable_text(tmp_path):
    line = read_first_line(write(tmp_path / "P.txt", (bytes(range(10)) + bytes(range(11, 256))) * 64))
    assert line is not None
    assert len(line) <= 200
    assert all(ch.isprintable() for ch in line)


def test_huge_file_is_read_bounded(tmp_path):
    path = tmp_path / "P.txt"
    with open(path, "wb") as f:
        f.write(b"Epoch 1/2\n")
        f.truncate(100 * 1024 * 1024)  # sparse: 100 MB without writing it
    assert read_first_line(str(path)) == "Epoch 1/2"


@pytest.mark.parametrize("make", ["missing", "directory", "fifo"])
def test_no_regular_file_is_none(tmp_path, make):
    path = tmp_path / "P.txt"
    if make == "directory":
        path.mkdir()
    elif make == "fifo":
        os.mkfifo(path)  # with no writer, a blocking open would hang forever
    assert read_first_line(str(path)) is None


def test_a_scan_that_does_not_answer_never_blocks_the_caller_and_is_measured(tmp_path):
    """A stat on a dead network mount blocks for minutes: the loop must keep running and see it."""
    import threading

    from supervisor.watch.progress_files import Scanner

    release = threading.Event()

    class DeadMount(ProgressFiles):
        def read_changes(self):
            release.wait(10)  # what os.stat does on a hung NFS mount
            return super().read_changes()

    (tmp_path / "P.txt").write_text("Epoch 1/2\nexpect_next_s: 90\n")
    scanner = Scanner(DeadMount(str(tmp_path / "P.txt")))
    scanner.request(now=100.0)
    scanner.request(now=101.0)  # still the first one: not a second scan piling up
    assert scanner.take() == [] and scanner.hung_s(now=130.0) == 30.0
    release.set()
    import time

    deadline = time.monotonic() + 5
    while scanner.hung_s(now=131.0) and time.monotonic() < deadline:
        time.sleep(0.01)
    [(path, fields, first)] = scanner.take()
    assert path.endswith("P.txt") and fields["expect_next_s"] == "90" and first == "Epoch 1/2"
    assert scanner.first_line() == "Epoch 1/2" and scanner.hung_s(now=200.0) == 0.0
    scanner.close()
