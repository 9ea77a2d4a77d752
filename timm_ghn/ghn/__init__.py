"""Graph HyperNetworks: configuration, network and checkpoint loading."""

from timm_ghn.ghn.checkpoint import LoadedGHN, file_sha256, load_ghn, save_ghn
from timm_ghn.ghn.config import GHNConfig
from timm_ghn.ghn.network import GHN2, NodeEmbeddings

__all__ = ["GHN2", "GHNConfig", "LoadedGHN", "NodeEmbeddings", "file_sha256", "load_ghn", "save_ghn"]
