"""How global adapter versions (and optimizer state) are stored and served: fp32 safetensors, zstd."""

from __future__ import annotations

from schemas.events import TensorEncoding

BLOB_ENCODING = TensorEncoding(dtype="float32", quantization="none", compression="zstd")
