"""The tokenizer: shapes, causal convolutions, LFQ, and that it learns beyond a trivial baseline."""
import io
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import tiny_config  # noqa: E402

from trainer.checkpoint import load_checkpoint  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402
from trainer.data import background_baseline, make_moving_shapes  # noqa: E402
from trainer.model import CausalConv3d, LookupFreeQuantizer, VideoTokenizer  # noqa: E402
from trainer.run import run  # noqa: E402


@pytest.mark.parametrize("shape", [(2, 3, 8, 32, 32), (1, 1, 5, 20, 12), (1, 3, 1, 16, 16)])
def test_reconstruction_has_the_input_shape(shape):
    model = VideoTokenizer(ModelConfig(in_channels=shape[1], width=4, codebook_bits=4))
    recon, aux = model(torch.rand(shape))
    assert recon.shape == shape
    assert set(aux) == {"entropy_loss", "commit_loss", "quant_loss"}


def test_tokens_cover_the_latent_grid_and_the_codebook_range():
    model = VideoTokenizer(ModelConfig(width=4, codebook_bits=6, levels=2))
    tokens = model.tokenize(torch.rand(2, 3, 8, 32, 32))
    assert tokens.shape == (2, 4, 8, 8)  # T/2, H/4, W/4
    assert tokens.min() >= 0 and tokens.max() < 2 ** 6


def test_causal_conv_never_sees_later_frames():
    conv = CausalConv3d(2, 3)
    x = torch.rand(1, 2, 6, 8, 8)
    changed = x.clone()
    changed[:, :, 4:] += 1.0  # change frames 4 and 5 only
    same, moved = conv(x), conv(changed)
    assert torch.equal(same[:, :, :4], moved[:, :, :4])
    assert not torch.equal(same[:, :, 4:], moved[:, :, 4:])


def test_lfq_quantizes_to_signs_and_passes_gradients_straight_through():
    lfq = LookupFreeQuantizer(ModelConfig(codebook_bits=3))
    z = torch.tensor([0.3, -2.0, 0.01]).view(1, 3, 1, 1, 1).requires_grad_()
    q, index, aux = lfq(z)
    assert q.flatten().tolist() == [1.0, -1.0, 1.0]
    assert index.item() == 0b101  # bit i set where channel i is positive
    q.sum().backward()
    assert z.grad.flatten().tolist() == [1.0, 1.0, 1.0]
    # commitment: mean squared distance to the chosen corner
    expected = ((0.3 - 1) ** 2 + (-2.0 + 1) ** 2 + (0.01 - 1) ** 2) / 3
    assert aux["commit_loss"].item() == pytest.approx(expected, rel=1e-5)


def test_entropy_term_prefers_confident_and_diverse_codes():
    lfq = LookupFreeQuantizer(ModelConfig(codebook_bits=2))
    corners = torch.tensor([[1.0, 1], [1, -1], [-1, 1], [-1, -1]])  # all four codes, sure
    collapsed = torch.tensor([[1.0, 1]] * 4)  # one code for everything
    unsure = torch.zeros(4, 2)  # every position undecided
    loss = {name: lfq._entropy_loss(z).item()
            for name, z in [("corners", corners), ("collapsed", collapsed), ("unsure", unsure)]}
    assert loss["corners"] < loss["collapsed"] and loss["corners"] < loss["unsure"]


def test_training_beats_predicting_the_background(tmp_path):
    # the synthetic set's trivial answer is each clip's background colour everywhere
    # 128 training clips of 3x4x16x16, 6 epochs of 16 steps
    config = tiny_config(tmp_path, samples=160, epochs=6, batch_size=8, lr=2e-3,
                         model=ModelConfig(width=8, codebook_bits=8), log_every_s=3600)
    with redirect_stdout(io.StringIO()):
        assert run(config) == 0
    history = load_checkpoint(tmp_path / "checkpoint.pt")["history"]
    baseline = background_baseline(
        make_moving_shapes(config.samples, config.frames, config.size, config.seed).videos)
    # starts above it (from mid-grey), ends well below it, on clips it never trained on
    assert history[0]["train_loss"] > baseline, (baseline, history)
    assert history[-1]["val_loss"] < 0.7 * baseline, (baseline, history)
    assert history[-1]["train_loss"] < 0.75 * baseline, (baseline, history)
