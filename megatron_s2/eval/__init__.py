"""Quality evaluation: needle (passkey) retrieval and held-out loss (no Megatron import)."""
