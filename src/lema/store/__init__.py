"""Weight store: checkpoint files memory-mapped, tensors served as views, keys mapped to the model."""

from .checkpoint import PACKED_FORMAT, WeightStore, weight_files, weights_bytes, weights_fingerprint
from .safetensors_file import SafetensorsFile, TensorEntry, WeightsFileError

__all__ = ["PACKED_FORMAT", "SafetensorsFile", "TensorEntry", "WeightStore", "WeightsFileError", "weight_files",
           "weights_bytes", "weights_fingerprint"]
