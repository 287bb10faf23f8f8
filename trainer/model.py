"""A small MAGVIT-v2-style video tokenizer: causal 3D conv encoder, LFQ, 3D conv decoder.

Shapes use B batch, C channels, T frames, H x W pixels; t, h, w are the latent grid
(T/2 with temporal_downsample, H/2**levels, W/2**levels) and K = codebook_bits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig

# GroupNorm with one group (LayerNorm over C, T, H, W): with 8 groups of a few channels
# each, a flat-colour clip normalises to zero and its colour is lost
GROUPS = 1


class CausalConv3d(nn.Module):
    """3D convolution that sees only the current and earlier frames.

    With a time stride s, output frame j sees input frames up to s*j + s - 1: the whole
    group of s frames it stands for, and nothing later. (Padding k-1 would make it end
    at s*j, so the decoder would have to guess the rest of the group.)
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride=(1, 1, 1)):
        super().__init__()
        # pad time on the left only (causal), space on both sides ("same" before striding)
        self.time_pad = kernel - stride[0]
        self.space_pad = kernel // 2
        self.conv = nn.Conv3d(in_ch, out_ch, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T, H, W); F.pad takes (W_left, W_right, H_top, H_bottom, T_front, T_back)
        p = self.space_pad
        # a last group shorter than the stride is completed with copies of the last frame
        tail = -x.shape[2] % self.conv.stride[0]
        # replicate keeps the first frame's statistics instead of fading it to black
        x = F.pad(x, (p, p, p, p, self.time_pad, tail), mode="replicate")
        return self.conv(x)


class ResBlock3d(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, causal conv) twice.

    The second conv starts at zero (see VideoTokenizer), so each block starts as identity.
    """

    def __init__(self, ch: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, ch)
        self.conv1 = CausalConv3d(ch, ch)
        self.norm2 = nn.GroupNorm(GROUPS, ch)
        self.conv2 = CausalConv3d(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h  # (B, ch, T, H, W)


class Encoder(nn.Module):
    """Map a clip (B, C, T, H, W) to continuous latents (B, K, t, h, w)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.width
        self.conv_in = CausalConv3d(cfg.in_channels, w)  # (B, w, T, H, W)
        blocks = []
        for level in range(cfg.levels):
            ch = w << level
            t_stride = 2 if cfg.temporal_downsample and level == 0 else 1
            # (B, ch, ...) -> (B, 2ch, T/t_stride, H/2, W/2)
            blocks += [CausalConv3d(ch, 2 * ch, stride=(t_stride, 2, 2)), ResBlock3d(2 * ch)]
        self.blocks = nn.Sequential(*blocks)
        top = w << cfg.levels
        self.norm_out = nn.GroupNorm(GROUPS, top)
        self.conv_out = nn.Conv3d(top, cfg.codebook_bits, 1)  # (B, K, t, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.silu(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(x)))


class Upsample(nn.Module):
    """Repeat pixels (and frames) then convolve; repeating frames keeps time causal."""

    def __init__(self, in_ch: int, out_ch: int, scale=(1, 2, 2)):
        super().__init__()
        self.scale = scale
        self.conv = CausalConv3d(in_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


class Decoder(nn.Module):
    """Map quantized latents (B, K, t, h, w) back to a clip (B, C, T', H', W')."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.width
        top = w << cfg.levels
        blocks = [CausalConv3d(cfg.codebook_bits, top)]  # (B, top, t, h, w)
        for level in reversed(range(cfg.levels)):
            ch = w << level
            t_scale = 2 if cfg.temporal_downsample and level == 0 else 1
            # (B, 2ch, ...) -> (B, ch, T*t_scale, H*2, W*2)
            blocks += [ResBlock3d(2 * ch), Upsample(2 * ch, ch, (t_scale, 2, 2))]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(GROUPS, w)
        self.conv_out = CausalConv3d(w, cfg.in_channels)  # (B, C, T, H, W)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(q))))


class LookupFreeQuantizer(nn.Module):
    """LFQ (MAGVIT-v2): each latent channel is quantized to -1 or +1 on its own.

    The codebook {-1, +1}^K is implicit; the entropy term asks each position to be
    confident about its code while all positions together use many codes.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        bits = torch.arange(cfg.codebook_bits)
        codes = torch.arange(2 ** cfg.codebook_bits)
        # codebook[i] is code i written as +-1 bits: (2**K, K)
        self.register_buffer("codebook", ((codes[:, None] >> bits) & 1).float() * 2 - 1,
                             persistent=False)

    def forward(self, z: torch.Tensor):
        """Quantize z (B, K, t, h, w); return (q, indices, aux losses)."""
        hard = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
        q = z + (hard - z).detach()  # straight-through estimator: forward q, backward identity
        weights = (1 << torch.arange(z.shape[1], device=z.device)).view(1, -1, 1, 1, 1)
        indices = ((z > 0).long() * weights).sum(1)  # (B, t, h, w)
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float().movedim(1, -1).reshape(-1, z.shape[1])  # (N, K), N = B*t*h*w
            entropy = self._entropy_loss(zf)
            commit = F.mse_loss(zf, torch.where(zf > 0, 1.0, -1.0))
        aux = {"entropy_loss": entropy, "commit_loss": commit,
               "quant_loss": self.cfg.entropy_weight * entropy + self.cfg.commitment_weight * commit}
        return q, indices, aux

    def _entropy_loss(self, zf: torch.Tensor) -> torch.Tensor:
        # ||z - c||^2 = ||z||^2 + K - 2<z, c>: only the last term depends on the code c
        logits = 2 * zf @ self.codebook.t() / self.cfg.temperature  # (N, 2**K)
        log_p = logits.log_softmax(-1)
        p = log_p.exp()
        per_sample = -(p * log_p).sum(-1).mean()  # low: each position picks one code
        avg_p = p.mean(0)
        codebook = -(avg_p * avg_p.clamp_min(1e-12).log()).sum()  # high: many codes in use
        return per_sample - self.cfg.diversity_gamma * codebook


class VideoTokenizer(nn.Module):
    """Encoder -> LFQ -> decoder; forward returns the reconstruction and quantizer terms."""

    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = LookupFreeQuantizer(cfg)
        self.decoder = Decoder(cfg)
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv3d):
                if name.endswith("conv2.conv") or name == "decoder.conv_out.conv":
                    # residual branches start as identity, the output as mid-grey
                    nn.init.zeros_(module.weight)
                else:
                    # PyTorch's default init shrinks the signal ~1.7x a conv: the encoder
                    # would hardly learn within a few hundred steps
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, video: torch.Tensor):
        """Reconstruct video (B, C, T, H, W); return (recon same shape, aux losses dict)."""
        z = self.encoder(video * 2 - 1)  # (B, K, t, h, w); pixels centred on 0
        q, _, aux = self.quantizer(z)
        recon = self.decoder(q) * 0.5 + 0.5  # (B, C, >=T, >=H, >=W): strides round sizes up
        T, H, W = video.shape[-3:]
        return recon[:, :, :T, :H, :W], aux

    @torch.no_grad()
    def tokenize(self, video: torch.Tensor) -> torch.Tensor:
        """Return the code indices (B, t, h, w) of video (B, C, T, H, W)."""
        return self.quantizer(self.encoder(video * 2 - 1))[1]


def reconstruction_loss(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Mean squared error per pixel, in float32 (comparable between train and val)."""
    return F.mse_loss(recon.float(), video.float())
