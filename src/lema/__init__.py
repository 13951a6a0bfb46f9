"""LEMA: LoRA fine-tuning of language models larger than the GPU, streaming frozen weights layer by layer."""

from .config import LemaConfig, MemoryStrategy
from .model import LemaModel
from .trainer import LemaTrainer

__version__ = "0.1.0"
__all__ = ["LemaConfig", "LemaModel", "LemaTrainer", "MemoryStrategy", "__version__"]
