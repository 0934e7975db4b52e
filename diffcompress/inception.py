"""The FID Inception-v3 (the 2015-12-05 TensorFlow graph the ADM evaluator runs) in PyTorch.

State-dict keys are torchvision's ``Inception3`` keys (1008 classes, no auxiliary head), so the widely used
converted weights ``pt_inception-2015-12-05-6726825d.pth`` load strictly. The graph's quirks are kept: average
pools that exclude padding, a max pool in the last block's pool branch, BatchNorm eps 1e-3, and its input
pipeline, a legacy (corner-aligned, no half-pixel offset) bilinear resize to 299 followed by ``(x - 128) / 128``.

Taps, named as in the graph: ``pool_3`` (2048-d, FID and precision/recall), ``mixed_6/conv`` (the 1x1 branch of
the third 17x17 block, ``Mixed_6d``; its first 7 channels flattened in NHWC order are sFID's 2023-d features)
and the logits ``pool_3 @ W`` without bias, which is how the ADM evaluator computes its softmax for IS.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .downloads import fetch_weights, file_digest

WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
SPATIAL_CHANNELS = 7


class BasicConv2d(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)
        self.add_module("relu", nn.ReLU(inplace=True))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # 35x35
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool(x)),
            ],
            1,
        )


class InceptionB(nn.Module):  # 35x35 -> 17x17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), dbl, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # 17x17
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):  # 17x17 -> 8x8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # 8x8; the graph's last block pools with max, the one before with average
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


def legacy_resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """``[size_out, size_in]`` weights of TF1's ResizeBilinear (align_corners=False, no half-pixel centres):
    output pixel i samples input coordinate ``i * size_in / size_out``."""
    src = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
    lo = src.floor().long().clamp(max=size_in - 1)
    hi = (lo + 1).clamp(max=size_in - 1)
    frac = src - lo
    m = torch.zeros(size_out, size_in, dtype=torch.float64)
    m[torch.arange(size_out), lo] += 1 - frac
    m[torch.arange(size_out), hi] += frac
    return m


class FIDInception(nn.Module):
    """``forward(images)``: uint8 or float ``[N, H, W, 3]`` pixels in [0, 255] -> dict of the graph's taps."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.fc.weight.device, torch.float32).permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        if (h, w) != (299, 299):
            rh = legacy_resize_matrix(h, 299).to(x)
            rw = legacy_resize_matrix(w, 299).to(x)
            x = torch.einsum("oh,nchw,pw->ncop", rh, x, rw)
        return ((x - 128) / 128).contiguous(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6c(self.Mixed_6b(x))
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]
        x = self.Mixed_6e(self.Mixed_6d(x))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = x.mean(dim=(2, 3))
        return {
            "pool_3": pool,
            "mixed_6/conv": spatial.permute(0, 2, 3, 1).flatten(1),  # NHWC flattening, as the ADM arrays
            "logits": pool @ self.fc.weight.T,
        }


class TorchInception:
    """The evaluator's default backend: ``activations`` (pool_3, sFID features) and ``softmax`` of pool_3."""

    name = "torch"

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        path = fetch_weights(weights, WEIGHTS_FILE, WEIGHTS_URL, "FID Inception weights", "--inception-weights")
        from .checkpoint import load_file

        self.device = torch.device(device)
        self.model = FIDInception()
        self.model.load_state_dict(load_file(path), strict=True)
        self.model.eval().requires_grad_(False).to(self.device, memory_format=torch.channels_last)
        self._identity = f"torch:{file_digest(path)}"

    def identity(self) -> str:
        return self._identity

    @torch.inference_mode()
    def activations(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.model(torch.from_numpy(np.array(images, copy=True)))  # frombuffer arrays are read-only
        return out["pool_3"].float().cpu().numpy(), out["mixed_6/conv"].float().cpu().numpy()

    @torch.inference_mode()
    def softmax(self, pool: np.ndarray) -> np.ndarray:
        w = self.model.fc.weight
        logits = torch.from_numpy(np.asarray(pool, np.float32)).to(w.device) @ w.T
        return logits.softmax(dim=1).cpu().numpy()
