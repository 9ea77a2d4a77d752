"""timm_ghn: predict timm model parameters with Graph HyperNetworks."""
__version__ = "0.1.0"
