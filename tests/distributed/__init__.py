"""Tests of sparsecc under torch.distributed (tensor parallelism, CPU, gloo)."""
