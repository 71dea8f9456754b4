"""opa_jax: the one-pixel attack (Su, Vargas & Sakurai, 2019) as one compiled JAX step.

The Python API (README, "Attack your own model"): `Model`, `InputConvention`,
`attack_images`, `run_attack`, `export_adversarial`.
"""

__version__ = "0.1.0"

from opa_jax.api import (  # noqa: E402
    AttackResult,
    Model,
    attack_images,
    export_adversarial,
    run_attack,
    set_cpu_devices,
)
from opa_jax.models.convention import InputConvention  # noqa: E402

__all__ = [
    "AttackResult",
    "InputConvention",
    "Model",
    "attack_images",
    "export_adversarial",
    "run_attack",
    "set_cpu_devices",
]
