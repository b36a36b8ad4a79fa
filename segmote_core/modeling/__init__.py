"""SegMoTE model modules (composition over stock ``segment_anything``)."""

from .mask_decoder import SegMoTEMaskDecoder
from .mote import MoTERouter, RoutingResult, cv_squared
from .ppt import LearnedTextEncoder, MiniLMTextEncoder, PromptTokenizer
from .segmote import DecoderOutput, ImageFeatures, SegMoTE, routing_heatmaps, stability_score

__all__ = [
    "SegMoTE", "ImageFeatures", "DecoderOutput", "SegMoTEMaskDecoder", "MoTERouter",
    "RoutingResult", "cv_squared", "PromptTokenizer", "LearnedTextEncoder", "MiniLMTextEncoder",
    "routing_heatmaps", "stability_score",
]
