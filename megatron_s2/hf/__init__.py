"""Hugging Face side of megatron_s2: S2 Llama configuration/modeling (copied on export) and the
Megatron <-> HF conversion used by tools/convert_to_hf.py and tools/convert_from_hf.py (not copied):
convert.py (arguments <-> HF config), weight_mapping.py (state-dict mapping), megatron_model.py
(building the Megatron model in this process), checkpoints.py (checkpoint and output-folder I/O)."""
