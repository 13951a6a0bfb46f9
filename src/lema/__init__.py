"""LEMA: LoRA fine-tuning of language models larger than the GPU, streaming frozen weights layer by layer."""

import warnings

# PEFT asks Transformers 5 for a gradient-checkpointing flag it has deprecated; LEMA never uses that flag
# (it checkpoints each streamed layer itself), so the warning says nothing to a LEMA user.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
# PEFT fuses LoRA targets that Transformers 5 fuses (gate_proj + up_proj -> an MoE's experts.gate_up_proj parameter)
# with a rank_pattern of its own making, then warns that the pattern matched no module: it matched the parameter,
# and the rank is applied (2 r). LEMA sets no rank_pattern of its own, so the warning is always that false one.
warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match any targeted module",
                        category=RuntimeWarning)

from .config import LemaConfig, MemoryStrategy
from .model import LemaModel
from .trainer import LemaTrainer

__version__ = "0.1.0"
__all__ = ["LemaConfig", "LemaModel", "LemaTrainer", "MemoryStrategy", "__version__"]
