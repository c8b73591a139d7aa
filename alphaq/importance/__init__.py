"""Importance matrices: llama.cpp's per-column activation statistic and its files."""
