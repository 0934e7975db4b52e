"""Plumbing shared by every script: checkpoints, devices and processes, VAE, logging."""
