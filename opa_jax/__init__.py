"""opa_jax: the one-pixel attack (Su, Vargas & Sakurai, 2019) as one compiled JAX step.

The Python API (README, "Attack your own model"): `Model`, `InputConvention`,
`attack_images`, `run_attack`, `export_adversarial`.
"""

from opa_jax._version import __version__
from opa_jax.api import (
    AttackResult,
    Model,
    attack_images,
    export_adversarial,
    run_attack,
    set_cpu_devices,
)
from opa_jax.models.convention import InputConvention

__all__ = [
    "__version__",
    "AttackResult",
    "InputConvention",
    "Model",
    "attack_images",
    "export_adversarial",
    "run_attack",
    "set_cpu_devices",
]
