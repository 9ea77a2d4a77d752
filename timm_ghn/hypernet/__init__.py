"""Graph HyperNetworks (GHN-1, GHN-2, GHN-3): configuration, networks and checkpoint loading."""

from timm_ghn.hypernet.checkpoint import LoadedGHN, build_network, file_sha256, load_ghn, save_ghn
from timm_ghn.hypernet.config import GHN3Config, GHNConfig, infer_ghn3_config
from timm_ghn.hypernet.network import GHN2, GHN3, NodeEmbeddings

__all__ = [
    "GHN2",
    "GHN3",
    "GHN3Config",
    "GHNConfig",
    "LoadedGHN",
    "NodeEmbeddings",
    "build_network",
    "file_sha256",
    "infer_ghn3_config",
    "load_ghn",
    "save_ghn",
]
