"""Adapter files: read (validated, grouped by module, with warnings) and write (atomic, no clobber), plus metadata."""
from hadakron.io.errors import AdapterFileError
from hadakron.io.metadata import build_metadata, safetensors_hashes, with_hashes
from hadakron.io.reader import AdapterFile, read_adapter, read_metadata
from hadakron.io.safetensors_format import HEADER_LIMIT_BYTES
from hadakron.io.writer import write_adapter

__all__ = [
    "AdapterFile", "AdapterFileError", "HEADER_LIMIT_BYTES", "build_metadata", "read_adapter", "read_metadata",
    "safetensors_hashes", "with_hashes", "write_adapter",
]
