"""Output counters (SPEC 1.2), from the lines real frameworks print: no processes, no clock."""

import pytest

from supervisor.watch.counters import Segments, Tracker, parse, strip_ansi

# (id, line, counters as (N or number, M or None) in order; None: no counter at all)
PARSE = [
    ("the seed's batch line", "Epoch 3/100 - Batch 120/400 - Loss: 0.5432", [(3, 100), (120, 400)]),
    ("the seed's batch line, indented", "  Batch 12/400 - Loss: 0.5432", [(12, 400)]),
    ("tqdm", "  3%|▎         | 12/400 [00:01<00:30,  8.00it/s]", [(12, 400)]),
    ("tqdm with a description and postfix", "train:  45%|████▌     | 45/100 [00:01<00:02, 25.3it/s, loss=0.123]",
     [(45, 100)]),
    ("tqdm before its first step", "  0%|          | 0/400 [00:00<?, ?it/s]", [(0, 400)]),
    ("tqdm slower than 1 it/s", " 50%|█████     | 2/4 [00:02<00:02,  1.20s/it]", [(2, 4)]),
    ("Keras", "12/400 [====>.........................] - ETA: 3s - loss: 0.4321", [(12, 400)]),
    ("Keras at its end", "400/400 [==============================] - 5s 12ms/step - loss: 0.3", [(400, 400)]),
    ("Keras' epoch line", "Epoch 3/10", [(3, 10)]),
    ("Rich (Lightning's RichProgressBar)",
     "Epoch 0/2  ━━━━━━━━━━━━━╸━━━━━━━━━ 17/32 0:00:01 • 0:00:01 29.47it/s v_num: 0 train_loss: 0.123",
     [(0, 2), (17, 32)]),
    ("Lightning's TQDM bar",
     "Epoch 0:  45%|████▌     | 45/100 [00:01<00:02, 25.3it/s, v_num=0, train_loss=0.123]", [(0, None), (45, 100)]),
    ("Lightning's validation bar", "Validation DataLoader 0: 100%|██████████| 20/20 [00:00<00:00, 80.1it/s]",
     [(20, 20)]),
    ("HF Trainer's dict log", "{'loss': 2.3012, 'grad_norm': 1.51, 'learning_rate': 4.5e-05, 'epoch': 0.46}",
     [(0.46, None)]),
    ("quoted numbers", "{'epoch': '0.46'}", [(0.46, None)]),
    ("JSON", '{"step": 120, "loss": 0.3}', [(120, None)]),
    ("step=", "step=120 loss=0.31 lr=3e-4", [(120, None)]),
    ("global_step", "global_step: 500", [(500, None)]),
    ("iter", "iter 7 | loss 2.31 | 1.2s/it", [(7, None)]),
    ("iteration", "Iteration 300, lr 0.001", [(300, None)]),
    ("python logging with a date and time", "2026-12-06 06:12:57,123 INFO step=120 loss=0.3", [(120, None)]),
    ("the seed's heartbeat: its clock is no counter", "[HEARTBEAT 14:03:05] Training active...", None),
    ("the seed's heartbeat: 45s is a duration",
     "[HEARTBEAT 14:03:05] last step 45s ago, epoch 3 batch 120", [(3, None), (120, None)]),
    ("a time of day", "saved at 14:03:05", None),
    ("a date", "run of 2026-12-06, and 12/06/2026", None),
    ("durations", "took 12s, then 3m, then 00:01, then 0:00:08", None),
    ("ETA", "ETA: 3s", None),
    ("rates", "8.0it/s 1.2s/it 3.4 samples/s", None),
    ("a percentage alone", "37%", None),
    ("a version", "torch 2.13.0 on cuda0", None),
    ("the supervisor's own line",
     "[supervise 14:03:05] heartbeat pid=1 up=5m silent=30s progress=none | Epoch 3/100 - Batch 120/400", None),
    ("words with numbers in them", "loading conv1d layer3 from GPU0", None),
    ("a sentence with 'it'", "it took a while", None),
]


@pytest.mark.parametrize("line,expected", [(p[1], p[2]) for p in PARSE], ids=[p[0] for p in PARSE])
def test_parse(line, expected):
    found = parse(line)
    if expected is None:
        assert found is None, found
    else:
        assert found is not None and [(n, m) for n, m in found.items] == expected


def moves(lines):
    """Feed lines one second apart; return (t, value, total, finished) for each move."""
    tracker = Tracker()
    out = []
    for t, line in enumerate(lines):
        move = tracker.feed(line, float(t))
        if move is not None:
            out.append((t, move.value, move.total, move.finished))
    return out


TRACK = [
    ("the first line of a shape is only its baseline", ["Batch 1/400"], []),
    ("a batch counter moves", ["Batch 1/400", "Batch 2/400", "Batch 2/400", "Batch 3/400"],
     [(1, 2, 400, False), (3, 3, 400, False)]),
    ("tqdm redraws: glyphs, times and rates change, the shape does not",
     ["  0%|          | 0/4 [00:00<?, ?it/s]", " 25%|██▌       | 1/4 [00:01<00:03,  1.00it/s]",
      " 25%|██▌       | 1/4 [00:02<00:03,  1.00it/s]", "100%|██████████| 4/4 [00:04<00:00,  1.00it/s]"],
     [(1, 1, 4, False), (3, 4, 4, True)]),
    ("a heartbeat thread's clock ticks: no move",
     ["[HEARTBEAT 14:03:05] Training active...", "[HEARTBEAT 14:03:35] Training active...",
      "[HEARTBEAT 14:04:05] last step 45s ago, epoch 3 batch 120",
      "[HEARTBEAT 14:04:35] last step 75s ago, epoch 3 batch 120"], []),
    ("a heartbeat between batch lines is a line of its own shape",
     ["Epoch 1/1 - Batch 1/10", "[HEARTBEAT 14:03:05] last step 1s ago, epoch 1 batch 1",
      "Epoch 1/1 - Batch 2/10", "[HEARTBEAT 14:03:35] last step 31s ago, epoch 1 batch 2"],
     [(2, 2, 10, False), (3, 2, None, False)]),
    ("HF Trainer's dict logs move by their epoch",
     ["{'loss': 2.3, 'grad_norm': 1.5, 'learning_rate': 5e-05, 'epoch': 0.1}",
      "{'loss': 2.1, 'grad_norm': 1.2, 'learning_rate': 4.5e-05, 'epoch': 0.2}"], [(1, 0.2, None, False)]),
    ("Rich: the bar moves, the epoch stays",
     ["Epoch 0/2 ━━━━━━━━━━━━━━━ 16/32 0:00:01 • 0:00:01 29.47it/s",
      "Epoch 0/2 ━━━━━━━━━━━━━━━ 17/32 0:00:01 • 0:00:01 29.47it/s",
      "Epoch 0/2 ━━━━━━━━━━━━━━━ 17/32 0:00:02 • 0:00:01 29.47it/s",
      "Epoch 0/2 ━━━━━━━━━━━━━━━ 32/32 0:00:02 • 0:00:00 29.47it/s"],
     [(1, 17, 32, False), (3, 32, 32, True)]),
    ("a new epoch's bar going back to 0 is a move",
     ["Epoch 0:  99%| 99/100", "Epoch 0: 100%| 100/100", "Epoch 1:   0%| 0/100", "Epoch 1:   1%| 1/100"],
     [(1, 100, 100, True), (2, 1, None, False), (3, 1, 100, False)]),
    ("Keras: the bar's end has a shape of its own words, the same counter",
     ["398/400 [=====>.] - ETA: 1s - loss: 0.4", "399/400 [=====>.] - ETA: 0s - loss: 0.4",
      "400/400 [=======] - 5s 12ms/step - loss: 0.3"],
     [(1, 399, 400, False), (2, 400, 400, True)]),
    ("lines without counters are nothing", ["loading data", "Using cache", "37%", "ETA: 3s"], []),
]


@pytest.mark.parametrize("lines,expected", [(c[1], c[2]) for c in TRACK], ids=[c[0] for c in TRACK])
def test_tracker(lines, expected):
    assert moves(lines) == expected


def test_move_carries_its_line_and_when_the_shape_was_seen_before():
    tracker = Tracker()
    tracker.feed("step 1 loss 2.0", 10.0)
    move = tracker.feed("step 2 loss 1.9", 25.0)
    assert move.line == "step 2 loss 1.9" and move.previous_at == 10.0


def test_strip_ansi_rich_redraw():
    raw = "\x1b[?25l\x1b[2K\x1b[1A\x1b[2K\x1b[1;32mEpoch 0/2\x1b[0m \x1b[38;5;237m━━━\x1b[0m 17/32 \x1b]8;;x\x07link"
    assert strip_ansi(raw) == "Epoch 0/2 ━━━ 17/32 link"


SEGMENTS = [
    ("lines and redraws", [b"a 1/4\n", b"\rb 2/4\rb 3/4"], [["a 1/4"], ["b 2/4", "b 3/4"]]),
    ("the unfinished piece is read, and read again once whole", [b"Batch 1/4", b"0\n"], [["Batch 1/4"], ["Batch 1/40"]]),
    ("escapes split across chunks are whole by the time the line is", [b"x \x1b[3", b"2mstep 3\n"],
     [["x 3"], ["x step 3"]]),
]


@pytest.mark.parametrize("chunks,expected", [(c[1], c[2]) for c in SEGMENTS], ids=[c[0] for c in SEGMENTS])
def test_segments(chunks, expected):
    seg = Segments()
    assert [seg.feed(c, cut=False) for c in chunks] == expected


def test_segments_after_a_cut_skip_the_partial_first_piece():
    seg = Segments()
    assert seg.feed(b"ch 3/4\nBatch 4/4\n", cut=True) == ["Batch 4/4"]
    assert seg.feed(b"no break at all", cut=True) == []
