"""Geom-Erasing: implicit concept removal for text-to-image diffusion models.

Subpackages: ``geomerase.core`` (geometry, captions, models, losses, training,
sampling, metrics), ``geomerase.kernels`` (Triton kernels and their references),
``geomerase.distributed`` (Ray annotation, DeepSpeed training), ``geomerase.data``
(ICD builder, shards, loaders), ``geomerase.benchmarks``.
"""
__version__ = "0.1.0"
