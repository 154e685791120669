"""pycsm: Sesame's CSM-1B text-to-speech on ggml (placeholder; replaced by the lead)."""
