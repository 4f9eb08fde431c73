"""The model stage: NF4 experts (storage + autograd compute), streaming checkpoint loader, load_model + LoRA,
the audit of what is 4-bit and what trains, and the model shapes (tiny, Mixtral-8x7B)."""
