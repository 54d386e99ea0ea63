"""StreamFusion's torch.compile backend (``backend="streamfusion"``): not built yet.

The package exists so the stack (sf-comm -> sf-attn -> sf-compile) and its version checks are
in place; the FX pass and the ``torch_dynamo_backends`` entry point come with the backend.
"""

from sf_comm import require as _require

_require("sf-comm", "0.1.0", by="sf-compile")
_require("sf-attn", "0.1.0", by="sf-compile")

__version__ = "0.1.0"
__all__ = ["__version__"]
