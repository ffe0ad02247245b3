"""xMGIE: MLLM-guided image editing served as a batch job pipeline.

The model lives in :mod:`xmgie.editing`, model directories in :mod:`xmgie.loading`, the job
domain shared by the API and the workers in :mod:`xmgie.jobs`.
"""

from __future__ import annotations

__version__ = "0.1.0"
