"""uint8 RGB arrays -> normalised float tensors, with the mean/std of the model's ``model.json``."""

from __future__ import annotations

import numpy as np
import torch


class Normalizer:
    """``x = (pixel / 255 - mean) / std`` on ``(N, H, W, 3)`` uint8 -> ``(N, 3, H, W)`` float32."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))).view(1, 3, 1, 1)
        self.shift = (torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)).view(
            1, 3, 1, 1)

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        t = t.permute(0, 3, 1, 2).to(torch.float32)
        if t.device != self.scale.device:  # a GPU batch (training, calibration on a GPU)
            return t * self.scale.to(t.device) - self.shift.to(t.device)
        return t * self.scale - self.shift
