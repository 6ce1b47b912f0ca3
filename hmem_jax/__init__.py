"""hmem_jax: small language models that fetch context-dependent blocks from a hierarchical
memory bank."""

__version__ = "0.1.0"
