"""Evaluation: perplexity and KL through llama.cpp, the stock baselines, the offline corpus."""
