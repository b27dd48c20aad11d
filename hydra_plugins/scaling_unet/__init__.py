"""Hydra launchers of scaling-unet (found by Hydra's plugin discovery in the hydra_plugins namespace)."""
