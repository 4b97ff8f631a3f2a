"""Quantized weights behind the one linear-layer interface (module swaps, as in gpt-fast).

- `quantize_model(model, method)`: load-time quantization of a dense model
  (`kiln serve --quantize int8 | bnb-int8 | bnb-nf4`).
- GPTQ checkpoints (AutoGPTQ / GPTQModel format) load through `checkpoint.gptq_loader`;
  `calibrate.quantize_folder` makes them (`kiln quantize`).
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import QUANTIZE_METHODS as LOAD_TIME_METHODS


def quantize_model(model: nn.Module, method: str, include_lm_head: bool = True, row_amax=None) -> int:
    """Swap every dense linear layer of the decoder (and the LM head) for its quantized
    form; return how many were swapped. The embedding table stays as it is (a tied LM head
    gets its own quantized copy: reading it is most of a decode step's bytes at 135M).

    `row_amax` (tensor parallelism, int8): reduces the per-output-channel absolute maxima of
    a row-parallel layer's shard (o_proj, down_proj) to those of the whole row (an all-reduce
    max), so every rank's scales are those of the unsharded weight."""
    from ..models.layers import Linear

    if method not in LOAD_TIME_METHODS:
        raise ValueError(f"unknown quantization {method!r}: use one of {', '.join(LOAD_TIME_METHODS)}")
    if method == "int8":
        from .int8 import Int8Linear

        make = Int8Linear.from_float
    else:
        from .bnb import bnb_linear_factory

        make = bnb_linear_factory(method)
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, Linear) or (name == "lm_head" and not include_lm_head):
                continue
            weight = child.weight if child.weight is not None else child.packed.to_dense()
            with torch.no_grad():
                if row_amax is not None and name in ("o_proj", "down_proj"):
                    from .int8 import Int8Linear

                    setattr(parent, name, Int8Linear.from_float(weight, amax=row_amax(weight.detach().float().abs().amax(dim=1))))
                else:
                    setattr(parent, name, make(weight))
            swapped += 1
    return swapped
