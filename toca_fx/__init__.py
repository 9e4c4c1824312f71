"""toca_fx: token-wise feature caching (ToCa) for diffusion transformers, as an FX compiler pass.

Example::

    import toca_fx
    model = toca_fx.transform(model, toca_fx.ToCaConfig.preset("toca-dit-ddim50"))
    print(toca_fx.explain(model)); print(toca_fx.stats(model))
    toca_fx.remove(model)
"""

from .api import explain, generation, is_transformed, remove, reset, stats, transform
from .config import PRESETS, ToCaConfig
from .errors import Refusal, ToCaError

__all__ = ["transform", "remove", "reset", "explain", "stats", "generation", "is_transformed", "ToCaConfig",
           "ToCaError", "Refusal", "PRESETS"]
__version__ = "0.1.0"
