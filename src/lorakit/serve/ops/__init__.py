"""Batched heterogeneous adapter ops: one forward, every token with its own adapter (or none).

``reference.py`` holds the plain-torch semantics; ``batched.py`` the fast paths, planned once per
forward by ``SlotBatch`` (``batch.py``).
"""

from lorakit.serve.ops.batch import SlotBatch
from lorakit.serve.ops.batched import add_compressed_delta_, add_lora_delta_
from lorakit.serve.ops.reference import compressed_delta_ref, lora_delta_ref

__all__ = ["SlotBatch", "add_compressed_delta_", "add_lora_delta_", "compressed_delta_ref", "lora_delta_ref"]
