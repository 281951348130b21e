"""The slimfx dialect: ops compression adds to the IR, registered once each as ``torch.ops.slimfx.<name>``.

Importing this package registers them. Each has a torch reference implementation (graphs at every stage
still run in torch) and a fake implementation (shapes and dtypes propagate, symbolic ones included).
"""
from . import quant  # noqa: F401  (registers the quantization ops)
from .quant import OPS as QUANT_OPS  # noqa: F401
from . import fused  # noqa: F401  (registers the fusion ops)
from .fused import OPS as FUSED_OPS  # noqa: F401
from . import sparse  # noqa: F401  (registers the sparsity op)
from .sparse import OPS as SPARSE_OPS  # noqa: F401
