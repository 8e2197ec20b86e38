"""uint8 RGB arrays -> normalised float tensors, with the mean/std of the model's ``model.json``."""

from __future__ import annotations

import numpy as np
import torch


class Normalizer:
    """``x = (pixel / 255 - mean) / std`` on ``(N, H, W, 3)`` uint8 -> ``(N, 3, H, W)`` float32.

    ``device``: where to normalise a NumPy batch (the uint8 pixels are moved there first, a quarter of the
    float32 bytes); a tensor is normalised where it already is. The constants are copied to each device
    once.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))).view(1, 3, 1, 1)
        self.shift = (torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)).view(
            1, 3, 1, 1)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {self.scale.device: (self.scale,
                                                                                                self.shift)}

    def __call__(self, images: np.ndarray | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(images))
            if device is not None:
                t = t.to(device)
        else:
            t = images
        t = t.permute(0, 3, 1, 2).to(torch.float32)
        consts = self._on.get(t.device)
        if consts is None:  # a GPU batch (training, calibration on a GPU)
            consts = self._on[t.device] = (self.scale.to(t.device), self.shift.to(t.device))
        return t * consts[0] - consts[1]
