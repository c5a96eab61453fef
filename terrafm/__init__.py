"""terrafm: pretraining engine for TerraFM, a multisensor (Sentinel-1 + Sentinel-2) foundation model."""

__version__ = "0.1.0"
