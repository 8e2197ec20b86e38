"""Backbones split into exit stages, and their FLOPs."""

from service.backbones.flops import StageProfile, profile_stages, whole_model_flops
from service.backbones.registry import BackboneError, architecture_from_name, build_backbone
from service.backbones.staged import StagedNetwork

__all__ = [
    "BackboneError", "StageProfile", "StagedNetwork", "architecture_from_name", "build_backbone",
    "profile_stages", "whole_model_flops",
]
