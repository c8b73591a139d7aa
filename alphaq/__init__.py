"""alphaq-gguf: mixed-precision GGUF quantisation for MoE models, with no external data.

The front door (alphaq.api):

    import alphaq
    alphaq.convert("model-dir", "out.gguf", like="Q4_K_M")   # the default: damage on its own text
    alphaq.plan("model-bf16.gguf", budget=3)                  # AlphaQ, no forward pass
    alphaq.analyze("model-bf16.gguf")                         # PL_Alpha_Hill per matrix
"""

__version__ = "0.1.0"

from alphaq import api as _api  # noqa: E402
from alphaq import analyze, convert, plan  # noqa: E402  (modules, made callable below)
from alphaq.errors import AlphaQError, BudgetError, InputError, InternalError, QuantizeError  # noqa: E402

for _name in ("analyze", "convert", "plan"):
    _api.make_callable(f"alphaq.{_name}", getattr(_api, _name))

__all__ = ["AlphaQError", "BudgetError", "InputError", "InternalError", "QuantizeError", "__version__", "analyze",
           "convert", "plan"]
