"""The xMGIE model: MLLM, edit head and InstructPix2Pix diffusion, importable without any server.

The names below are imported on first use, so that the job service's light modules (``xmgie.editing.options``,
``errors``, ``images``) load without diffusers and transformers: the API and a starting worker stay quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xmgie.editing.edit_head import EditMapper
    from xmgie.editing.errors import EditInputError
    from xmgie.editing.options import EditOptions
    from xmgie.editing.pipeline import XMGIEPipeline, XMGIEPipelineOutput

_EXPORTS = {
    "EditInputError": "xmgie.editing.errors",
    "EditMapper": "xmgie.editing.edit_head",
    "EditOptions": "xmgie.editing.options",
    "XMGIEPipeline": "xmgie.editing.pipeline",
    "XMGIEPipelineOutput": "xmgie.editing.pipeline",
}

__all__ = ["EditInputError", "EditMapper", "EditOptions", "XMGIEPipeline", "XMGIEPipelineOutput"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xmgie.editing' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
