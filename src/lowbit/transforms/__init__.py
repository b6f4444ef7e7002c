"""Equivalent transformations: Hadamard rotation, smoothing, smooth rotation."""
