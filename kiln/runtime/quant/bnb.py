"""bitsandbytes weights at load time: LLM.int8() (`bnb-int8`) and NF4 (`bnb-nf4`), for users
who expect them (and for QLoRA later). bitsandbytes >= 0.45 runs both on the CPU through
its torch backend; it is optional, and asking for it without it installed is a clear error."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _bnb():
    try:
        import bitsandbytes
    except ImportError as exc:  # optional dependency
        raise ValueError(
            "--quantize bnb-int8 / bnb-nf4 need bitsandbytes (pip install 'kiln[bnb]', i.e. "
            f"bitsandbytes==0.50.2): {exc}") from None
    return bitsandbytes


class BnbLinear(nn.Module):
    """A bitsandbytes linear behind kiln's linear interface (no bias, any leading dims)."""

    def __init__(self, inner: nn.Module, in_features: int, out_features: int, method: str) -> None:
        super().__init__()
        self.inner, self.in_features, self.out_features, self.method = inner, in_features, out_features, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.method}"


def bnb_linear_factory(method: str) -> Callable[[torch.Tensor], nn.Module]:
    bnb = _bnb()

    def make(weight: torch.Tensor) -> nn.Module:
        out_features, in_features = weight.shape
        w = weight.detach().float().contiguous()
        device = w.device
        if method == "bnb-int8":
            inner = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False,
                                        threshold=6.0)
            inner.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        elif method == "bnb-nf4":
            inner = bnb.nn.Linear4bit(in_features, out_features, bias=False, quant_type="nf4",
                                      compute_dtype=torch.float32)
            inner.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
        else:
            raise ValueError(f"unknown bitsandbytes method {method!r}")
        inner = inner.to(device)  # moving to the device is what quantizes the weight
        return BnbLinear(inner, in_features, out_features, method)

    return make
