"""APTP: prompt-based pruning of Stable Diffusion into a mixture of experts (arXiv 2406.12042)."""
