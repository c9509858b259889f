"""The names an adapter source's files and folders go by (read by ``io`` on disk and ``hub`` in a repo listing)."""

from __future__ import annotations

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DIFFUSERS_WEIGHTS = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
COMPONENT_DIRS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
