"""The model as the pipeline reads it: the quantisable matrices of an HF checkpoint or a float GGUF."""
