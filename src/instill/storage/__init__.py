"""Files that are safe to trust: atomic writes (never half-written) and safetensors tensor files
(never unpickled). The core, the models and the run directories all write through here."""

from instill.storage.atomic import atomic_path, atomic_write_bytes, atomic_write_text, write_json
from instill.storage.tensors import load_tensors, save_tensors

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "load_tensors",
           "save_tensors", "write_json"]
