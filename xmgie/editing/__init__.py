"""The xMGIE model: MLLM, edit head and InstructPix2Pix diffusion, importable without any server."""

from __future__ import annotations

from xmgie.editing.edit_head import EditMapper
from xmgie.editing.errors import EditInputError
from xmgie.editing.options import EditOptions
from xmgie.editing.pipeline import XMGIEPipeline, XMGIEPipelineOutput

__all__ = ["EditInputError", "EditMapper", "EditOptions", "XMGIEPipeline", "XMGIEPipelineOutput"]
