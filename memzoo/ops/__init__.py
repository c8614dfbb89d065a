"""Pure tensor functions (no nn.Module): attention, RoPE, and each design's memory maths.

Every algorithm has a naive form that follows the paper's equations token by token and the fast
form the modules use; `tests/` holds them together.
"""
