"""Base models and LoRA adapters: what a federation's adapter tensors look like and how v0 is made."""
