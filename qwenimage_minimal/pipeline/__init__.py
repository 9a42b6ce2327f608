"""The components joined: the Qwen-Image pipelines, with diffusers' class names.

loading.py        an official folder -> its components (the transformer in fp8 or not: load_transformer)
text_to_image.py  QwenImagePipeline: encode, schedule, denoise, decode, and the checks every pipeline shares
edit.py           QwenImageEditPipeline, QwenImageEditPlusPipeline: the input image(s) read by the vision
                  tower into the prompt, and their latents beside the noise
img2img.py        QwenImageImg2ImgPipeline: start part-way along the flow, from a picture (strength)
inpaint.py        QwenImageInpaintPipeline, QwenImageEditInpaintPipeline: only the masked region changes
controlnet.py     QwenImageControlNetPipeline, QwenImageControlNetInpaintPipeline: ControlNets' residuals steer

from qwenimage_minimal import pipeline
pipe = pipeline.QwenImagePipeline.from_pretrained("Qwen-Image", device="cuda", dtype=torch.bfloat16)
"""

from .controlnet import QwenImageControlNetInpaintPipeline, QwenImageControlNetPipeline, load_controlnets
from .edit import ImageFeatures, QwenImageEditPipeline, QwenImageEditPlusPipeline, edit_pipeline_class
from .img2img import QwenImageImg2ImgPipeline, check_strength, strength_schedule
from .inpaint import QwenImageEditInpaintPipeline, QwenImageInpaintPipeline, load_mask
from .loading import COMPONENTS, check_model_folder, load_components, load_transformer, read_pipeline_defaults
from .text_to_image import MAX_SIDE, OUTPUT_TYPES, PipelineOutput, QwenImagePipeline

__all__ = [
    "COMPONENTS",
    "MAX_SIDE",
    "OUTPUT_TYPES",
    "ImageFeatures",
    "PipelineOutput",
    "QwenImageControlNetInpaintPipeline",
    "QwenImageControlNetPipeline",
    "QwenImageEditInpaintPipeline",
    "QwenImageEditPipeline",
    "QwenImageEditPlusPipeline",
    "QwenImageImg2ImgPipeline",
    "QwenImageInpaintPipeline",
    "QwenImagePipeline",
    "check_model_folder",
    "check_strength",
    "edit_pipeline_class",
    "load_components",
    "load_controlnets",
    "load_mask",
    "load_transformer",
    "read_pipeline_defaults",
    "strength_schedule",
]
