"""Allocation stage: costs per (tensor, type), the budget check and the exact knapsack -> one type per item."""
