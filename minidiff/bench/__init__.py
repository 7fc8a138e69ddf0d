"""python -m minidiff.bench: minidiff side by side with the reference libraries."""
