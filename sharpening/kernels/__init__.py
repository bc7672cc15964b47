"""CPU kernels, off the data path: faster ways to run the same maths on CPU, each equal to PyTorch's own op
to float32 rounding and switched on only where it applies.

- ``cpu_linear``: ``nn.Linear`` through oneDNN (forward and both gradients), and packing its weights for a
  run of decode steps.
- ``decode_attention``: one decode query's attention by two batched matmuls, in place of sdpa's flash kernel.

Nothing here decides what is computed: the sampler, the log-prob scorer and the policy loader call them.
"""
