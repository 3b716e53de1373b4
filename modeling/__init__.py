"""The model/LoRA layer both sides share: base models, LoRA adapters (what a federation's adapter tensors
look like, how v0 is made) and the storage encoding of adapter blobs. Imports only ``schemas``."""
