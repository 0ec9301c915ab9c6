"""CPU kernels in C++ (attention over key lists, the fused Gumbel-softmax), compiled on first use."""
