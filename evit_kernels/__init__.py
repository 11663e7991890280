"""evit_kernels: fused kernels and drop-in modules for EfficientViT models (MIT and Microsoft families).

``patch(model)`` swaps the recognised modules of a timm, efficientsam or Cream-style model for fused ones;
``info()`` says what this installation can run here.
"""

__version__ = "0.1.0"

from evit_kernels import ops  # noqa: E402  (registers the torch.ops.evit ops)
from evit_kernels.info import info  # noqa: E402
from evit_kernels.patch import PatchReport, fold_bn, patch, unpatch  # noqa: E402

__all__ = ["PatchReport", "fold_bn", "info", "ops", "patch", "unpatch", "__version__"]
