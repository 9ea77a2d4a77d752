"""Graph HyperNetworks: configuration, network and checkpoint loading."""

from timm_ghn.hypernet.checkpoint import LoadedGHN, file_sha256, load_ghn, save_ghn
from timm_ghn.hypernet.config import GHNConfig
from timm_ghn.hypernet.network import GHN2, NodeEmbeddings

__all__ = ["GHN2", "GHNConfig", "LoadedGHN", "NodeEmbeddings", "file_sha256", "load_ghn", "save_ghn"]
