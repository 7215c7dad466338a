"""PyTorch SAM architectures (ViT and TinyViT encoders, prompt encoder, mask decoder) with Meta's
state-dict key names, for loading checkpoints and exporting ONNX graphs."""
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import ARCHS, DECODER_DEFAULTS, Sam, arch_name, build_sam, build_sam_from_config, init_random_weights_
from .tiny_vit import TinyViT
from .transformer import TwoWayTransformer

__all__ = [
    "ARCHS",
    "DECODER_DEFAULTS",
    "ImageEncoderViT",
    "MaskDecoder",
    "PromptEncoder",
    "Sam",
    "TinyViT",
    "TwoWayTransformer",
    "arch_name",
    "build_sam",
    "build_sam_from_config",
    "init_random_weights_",
]
