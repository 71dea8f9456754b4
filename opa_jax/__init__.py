"""opa_jax: the one-pixel attack (Su, Vargas & Sakurai, 2019) as one compiled JAX step."""

__version__ = "0.1.0"
