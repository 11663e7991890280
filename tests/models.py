"""The real models the patch must handle, built offline with random weights and randomised untrained state."""

from __future__ import annotations

import torch
from torch import nn

from evit_kernels.bench import build_model, randomize_untrained_state

TIMM_MIT = [f"efficientvit_{n}" for n in ("b0", "b1", "b2", "b3", "l1", "l2", "l3")]
TIMM_MSRA = [f"efficientvit_m{i}" for i in range(6)]
SAM = [f"efficientvit-sam-{n}" for n in ("l0", "l1", "l2", "xl0", "xl1")]
CREAM = ["cream"]
ALL = TIMM_MIT + TIMM_MSRA + SAM + CREAM

ATTENTION_CLASSES = ("LiteMLA", "CascadedGroupAttention")


def build(name: str) -> nn.Module:
    """An eval-mode model; ``cream`` is the Cream-style fixture model of tests/cream_style.py."""
    if name == "cream":
        from tests.cream_style import build_cream_model

        model = build_cream_model()
        randomize_untrained_state(model)
        return model.eval()
    return build_model(name)


def input_sizes(name: str) -> list[tuple[int, int]]:
    """A small square input and a non-square one (SAM encoders need more pixels for their neck)."""
    if name.startswith("efficientvit-sam"):
        return [(128, 128), (160, 128)]
    if name == "cream":  # Cream's window attention accepts only the resolution it was built for
        return [(128, 128)]
    return [(64, 64), (96, 64)]


def count_classes(model: nn.Module, names: tuple[str, ...]) -> int:
    return sum(type(m).__name__ in names for m in model.modules())


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|, in fp64."""
    got, expected = got.double(), expected.double()
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_same_gradients(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 1e-4,
                          floor: float = 1e-2) -> None:
    """Every gradient within ``rtol`` of its own scale. A gradient that is zero in exact arithmetic (a BatchNorm
    bias feeding another training-mode BatchNorm) is only the rounding noise of sums whose terms are as large as
    the model's gradients, so each tensor's scale is floored at ``floor`` times the largest gradient (run the
    models in float64 with a tiny ``floor`` to see those gradients agree exactly)."""
    assert got.keys() == expected.keys() and expected
    floor = floor * max(g.abs().max().item() for g in expected.values())
    for name, ref in expected.items():
        scale = max(ref.abs().max().item(), floor)
        err = (got[name].double() - ref.double()).abs().max().item()
        assert err <= rtol * scale, f"{name}: error {err:.3e} > {rtol} x {scale:.3e}"


def randomize_bn(module: nn.Module, eps: float | None = None) -> nn.Module:
    """Random running statistics and affine parameters (signs included) for every BatchNorm in ``module``: a
    fresh BatchNorm hides folding mistakes. ``eps`` also sets each one's epsilon."""
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                if bn.running_mean is not None:
                    bn.running_mean.normal_()
                    bn.running_var.uniform_(0.5, 2.0)
                if bn.affine:
                    bn.weight.normal_()
                    bn.bias.normal_()
                if eps is not None:
                    bn.eps = eps
    return module


def with_child(module: nn.Module, path: str, child: nn.Module) -> nn.Module:
    """``module`` with the submodule at dotted ``path`` replaced by ``child`` (to build a configuration a rule or
    module must refuse)."""
    parent_path, _, name = path.rpartition(".")
    setattr(module.get_submodule(parent_path), name, child)
    return module
