"""Write only: what the ecosystem loads (peft adapter folders, merged transformers folders)."""

from .peft import export, export_merged, read_adapter_meta

__all__ = ["export", "export_merged", "read_adapter_meta"]
