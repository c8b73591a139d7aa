"""GGUF out: llama.cpp's quant types, its quantiser, split files and the expert-granular format."""
