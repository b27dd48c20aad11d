"""What every part of the sweep shares: errors, the run plan, the config key and params, composition, MLflow tags.

Imports nothing else of sweep/ (only data/ and model/ below it)."""

# The attribute a Hydra task function sets to ask hydra/sweeper=scaling_unet for the sweep's own logic around
# its launcher (sweep.orchestration.grid); any other app gets Hydra's basic sweeper (sweep/__main__.py sets it).
SWEEP_APP = "scaling_unet_sweep"
