"""python -m minidiff.convert: other libraries' checkpoints -> minidiff model folders."""
