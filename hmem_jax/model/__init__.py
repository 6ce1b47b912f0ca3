"""The anchor transformer and how memory enters it."""

from hmem_jax.model.transformer import Transformer, count_params, init_abstract

__all__ = ["Transformer", "count_params", "init_abstract"]
