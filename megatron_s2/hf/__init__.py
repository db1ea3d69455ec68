"""Hugging Face side of megatron_s2: S2 Llama configuration/modeling (copied on export) and the
Megatron <-> HF conversion (convert.py, used by tools/convert_to_hf.py and tools/convert_from_hf.py)."""
