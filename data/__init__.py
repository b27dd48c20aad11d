"""Data side of scaling-unet: manifests, synthetic explants, preprocessing, folds, slicing, input pipeline.

Data flow is one-way: ``data`` never imports ``model``, ``sweep`` or ``analysis``.
"""
