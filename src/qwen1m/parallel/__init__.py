"""Tensor parallelism: Megatron-style sharding of a Qwen2 model over the ranks of a process group."""
