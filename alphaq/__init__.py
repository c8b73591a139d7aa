"""alphaq-gguf: mixed-precision GGUF quantisation for MoE models, with no external data.

The front door (alphaq.api):

    import alphaq
    alphaq.convert("model-dir", "out.gguf", like="Q4_K_M")   # the default: damage on its own text
    alphaq.plan("model-bf16.gguf", budget=3)                  # AlphaQ, no forward pass
    alphaq.analyze("model-bf16.gguf")                         # PL_Alpha_Hill per matrix
"""

__version__ = "0.1.0"

# plain functions: no module of the package is named like them (the stages live in their folders)
from alphaq.api import analyze, convert, plan  # noqa: E402
from alphaq.errors import AlphaQError, BudgetError, InputError, InternalError, QuantizeError  # noqa: E402

__all__ = ["AlphaQError", "BudgetError", "InputError", "InternalError", "QuantizeError", "__version__", "analyze",
           "convert", "plan"]
