"""The torch reference of ``kernels/linear.cpp``: each weight's ``F.linear``, side by side, plus the residual."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def linear_reference(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] = (),
                     residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``cat([x W_g^T + b_g for each weight g], -1) (+ residual)``, in float64 so a test can bound both sides' error."""
    parts = [F.linear(x.double(), w.double(), biases[g].double() if biases else None) for g, w in enumerate(weights)]
    out = torch.cat(parts, dim=-1)
    return out if residual is None else out + residual.double()
