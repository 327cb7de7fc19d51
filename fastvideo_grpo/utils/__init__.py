"""Foundations every layer may use: the plug-in registry, dtypes and autocast, atomic file writes, random
draws, CPU thread counts, CUDA settings, and moving modules between host and device memory."""
