"""Backends: faster implementations of the ops in `runtime.ops`, registered per device.

This build has one backend, `cpu`, which runs the float32 reference op table (`runtime.ops.reference_ops`).
CUDA and Ascend backends, with capability probing at load time and a printable dispatch table, are the next
piece of work; they will register implementations whose oracle is the reference op of the same name.
"""
