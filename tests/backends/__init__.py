"""Backend tests: the torch.compile backend, Triton lowering (CPU: Triton interpreter)."""
