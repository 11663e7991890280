"""How a fused module recognises the originals it replaces: one :class:`Match` per original class.

A module matches when its class has the match's name, is defined where the match says (``type(m).__module__``),
carries every attribute the match lists, and each child the match names fits one of the matches given for it
(the same rule, one level down). A class name alone never decides.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

TIMM_MIT = "timm.models.efficientvit_mit"
TIMM_MSRA = "timm.models.efficientvit_msra"
MIT_HAN_LAB = ("efficientsam.models.nn.ops", "efficientvit.models.nn.ops")
MIT_HAN_LAB_NORM = ("efficientsam.models.nn.norm", "efficientvit.models.nn.norm")
DIFFUSERS_ATTENTION = "diffusers.models.attention_processor"
DIFFUSERS_NORMALIZATION = "diffusers.models.normalization"
DIFFUSERS_SANA_VIDEO = "diffusers.models.transformers.transformer_sana_video"
DIFFUSERS_SANA = "diffusers.models.transformers.sana_transformer"
PACKAGED = ("timm.", "efficientsam.", "efficientvit.", "torch.", "diffusers.")
"""Packages whose classes only the matches naming their exact module may match."""


@dataclass(frozen=True)
class Match:
    """Instances of ``class_name`` defined in one of ``modules`` and holding ``attributes``, whose children named
    in ``children`` each fit one of the matches given for them.

    ``modules`` None means Cream-style code, which users copy into their own files: any defining module outside
    :data:`PACKAGED`. ``children`` (attribute name, the matches one of which that child must fit) tells apart
    instances of one class that hold different blocks (a residual wrapper around an FFN or around a depthwise
    conv); each of its names is one of ``attributes``.
    """

    family: str
    class_name: str
    modules: tuple[str, ...] | None
    attributes: tuple[str, ...] = ()
    children: tuple[tuple[str, tuple[Match, ...]], ...] = ()

    def __post_init__(self) -> None:
        unlisted = [name for name, _ in self.children if name not in self.attributes]
        if unlisted:
            raise ValueError(f"{self.class_name}: the children {unlisted} must be among its attributes")

    def defined_here(self, module: nn.Module) -> bool:
        where = type(module).__module__
        return where in self.modules if self.modules is not None else not where.startswith(PACKAGED)

    def missing(self, module: nn.Module) -> list[str]:
        return [a for a in self.attributes if not hasattr(module, a)]

    def is_class_of(self, module: nn.Module) -> bool:
        """Whether ``module`` is of this match's class: name, defining module and attributes (children aside)."""
        return type(module).__name__ == self.class_name and self.defined_here(module) and not self.missing(module)

    def fits(self, module: nn.Module) -> bool:
        """Whether ``module`` is of this match's class and each of its named children fits."""
        return self.is_class_of(module) and all(recognise(getattr(module, name), matches)[0] is not None
                                                for name, matches in self.children)

    def class_mismatch(self, module: nn.Module) -> str:
        """Why ``module``, whose class has this match's name, is not of its class."""
        name = type(module).__name__
        if not self.defined_here(module):
            return f"{name} from {type(module).__module__} is not the {self.family} class"
        return f"{name} lacks the {self.family} attributes {self.missing(module)}"

    def child_mismatches(self, module: nn.Module) -> list[str]:
        """Why the children of ``module`` whose class names are the ones this match takes do not fit."""
        reasons = []
        for name, matches in self.children:
            _, reason = recognise(getattr(module, name), matches)
            if reason:
                reasons.append(f"{type(module).__name__}.{name}: {reason}")
        return reasons


def recognise(module: nn.Module | None, matches: Iterable[Match]) -> tuple[Match | None, str | None]:
    """The first of ``matches`` that ``module`` fits; else (None, why) when its class name, or that of a child a
    match names, is one of theirs but does not fit; else (None, None): simply another module, nothing to report
    (also a module of the right class that holds another kind of block)."""
    named = [match for match in matches if match.class_name == type(module).__name__]
    ours = [match for match in named if match.is_class_of(module)]
    if not ours:
        return None, "; ".join(match.class_mismatch(module) for match in named) or None
    fitting = next((match for match in ours if match.fits(module)), None)
    if fitting is not None:
        return fitting, None
    return None, "; ".join(reason for match in ours for reason in match.child_mismatches(module)) or None
