"""Model folders on disk: safetensors, strict loading, textual inversion, memory."""
