"""Running models: llama.cpp forward passes (memory-mapped), isolated llama.cpp builds, torch and Triton."""
