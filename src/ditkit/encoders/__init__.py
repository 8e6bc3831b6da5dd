"""Encoders around the DiT: the SD-VAE (images to latents and back), the text encoders (prompts to tokens) and the
frozen feature encoders that representation alignment (REPA) aligns to."""
