"""A1111 hypernetworks: the module layout, creation, blending and application in diffusers."""

from nbkit.networks.hypernetwork.apply import (
    applied_hypernetworks,
    apply_hypernetwork,
    apply_prompt_hypernetworks,
    hypernetworks_applied,
    parse_hypernet_prompt,
    remove_hypernetwork,
)
from nbkit.networks.hypernetwork.blend import blend_hypernetwork_files, blend_hypernetworks
from nbkit.networks.hypernetwork.create import HypernetworkStructure, create_hypernetwork, create_hypernetwork_file
from nbkit.networks.hypernetwork.module import Hypernetwork, HypernetworkModule

__all__ = [
    "Hypernetwork", "HypernetworkModule", "HypernetworkStructure", "applied_hypernetworks", "apply_hypernetwork",
    "apply_prompt_hypernetworks", "blend_hypernetwork_files", "blend_hypernetworks", "create_hypernetwork",
    "create_hypernetwork_file", "hypernetworks_applied", "parse_hypernet_prompt", "remove_hypernetwork",
]
