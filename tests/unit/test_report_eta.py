"""supervisor.eta: fraction done and ETA, pure, replayed from named histories."""
import pytest

from supervisor.watch.eta import eta_s, fraction_done, fraction_from_line, parse_fields

TRAINER_FILE = """Epoch 3/12 - Batch 20/39 - Loss: 0.0150
epoch: 3
total_epochs: 12
batch: 20
total_batches: 39
step: 98
train_loss: 0.0150
updated: 2026-11-28T14:03:05Z
"""


def approx_or_none(expected):
    return None if expected is None else pytest.approx(expected)


def test_fields_of_the_trainers_progress_file_skip_the_headline():
    fields = parse_fields(TRAINER_FILE)
    assert fields["epoch"] == "3" and fields["total_batches"] == "39"
    assert fields["updated"] == "2026-11-28T14:03:05Z"  # only the first colon splits
    assert "Epoch 3/12 - Batch 20/39 - Loss" not in fields


@pytest.mark.parametrize("fields, expected", [
    ({"epoch": "3", "total_epochs": "12", "batch": "20", "total_batches": "40"}, (2 + 0.5) / 12),
    ({"epoch": "1", "total_epochs": "1", "batch": "40", "total_batches": "40"}, 1.0),
    ({"epoch": "3", "total_epochs": "12"}, 3 / 12),  # an end-of-epoch update: epoch 3 is done
    ({"epoch": "13", "total_epochs": "12"}, 1.0),  # never past the end
    ({"epoch": "3"}, None),
    ({"epoch": "3", "total_epochs": "0"}, None),
    ({"epoch": "x", "total_epochs": "12"}, None),
    ({"epoch": "nan", "total_epochs": "12"}, None),
    ({}, None),
])
def test_fraction_done_from_the_progress_files_keys(fields, expected):
    assert fraction_done(fields) == approx_or_none(expected)


@pytest.mark.parametrize("line, expected", [
    ("Epoch 3/12 - Batch 20/40 - Loss: 0.0150", (2 + 0.5) / 12),
    ("step 250/1000 loss 0.3", 0.25),
    ("Epoch 1/12 - Train: 0.0551, Val: 0.0227", 1 / 12),
    ("loss 1.5/2 v2/3", None),  # decimals and names are not counters
    ("12/0 nothing", None),
    ("no counters here", None),
    ("", None),
    (None, None),
])
def test_fraction_from_a_lines_counters(line, expected):
    assert fraction_from_line(line) == approx_or_none(expected)


def test_eta_extrapolates_the_rate_of_the_last_ten_minutes():
    # 1% a minute for the last 10 minutes, after a slow start that must not count.
    samples = [(0.0, 0.0), (600.0, 0.01)] + [(600.0 + 60 * i, 0.01 + 0.01 * i) for i in range(1, 21)]
    now = samples[-1][0]
    assert eta_s(samples, now) == pytest.approx((1 - 0.21) * 60 / 0.01)


def test_time_since_the_newest_sample_counts_as_spent():
    samples = [(0.0, 0.0), (100.0, 0.5)]
    assert eta_s(samples, 100.0) == pytest.approx(100.0)
    assert eta_s(samples, 130.0) == pytest.approx(70.0)
    assert eta_s(samples, 1000.0) == 0.0


def test_a_resume_from_an_older_checkpoint_starts_the_rate_afresh():
    # Fast until 0.5, then a restart went back to 0.4 and progresses slowly.
    samples = [(0.0, 0.0), (10.0, 0.5), (20.0, 0.4), (120.0, 0.5)]
    assert eta_s(samples, 120.0) == pytest.approx(0.5 * 100 / 0.1)


def test_sparse_updates_use_the_two_newest_samples():
    # One update an hour: the 10-minute window holds one sample, so the two newest decide.
    samples = [(0.0, 0.1), (3600.0, 0.2), (7200.0, 0.3)]
    assert eta_s(samples, 7200.0) == pytest.approx(7 * 3600.0)


@pytest.mark.parametrize("samples", [
    [],
    [(5.0, 0.3)],
    [(5.0, 0.3), (10.0, 0.3)],  # no movement: no rate
    [(5.0, 0.3), (5.0, 0.4)],  # no time between them
    [(5.0, None), (10.0, None)],
])
def test_no_eta_without_a_rate(samples):
    assert eta_s(samples, 20.0) is None


def test_a_finished_job_has_nothing_left():
    assert eta_s([(5.0, 1.0)], 20.0) == 0.0
