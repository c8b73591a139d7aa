"""Spectral stage: heavy-tailedness (PL_Alpha_Hill, FARMS, fix-finger) of every weight matrix, from the weights alone."""
