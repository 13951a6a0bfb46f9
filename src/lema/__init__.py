"""LEMA: LoRA fine-tuning of language models larger than the GPU, streaming frozen weights layer by layer."""

import warnings

# PEFT asks Transformers 5 for a gradient-checkpointing flag it has deprecated; LEMA never uses that flag
# (it checkpoints each streamed layer itself), so the warning says nothing to a LEMA user.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

from .config import LemaConfig, MemoryStrategy
from .model import LemaModel
from .trainer import LemaTrainer

__version__ = "0.1.0"
__all__ = ["LemaConfig", "LemaModel", "LemaTrainer", "MemoryStrategy", "__version__"]
