"""How `train` spreads the one train step over devices and hosts (see `plan`)."""

from jaxlora.parallel.collective import LOCAL, Collective, pmap_collective
from jaxlora.parallel.distributed import init_distributed
from jaxlora.parallel.mesh import make_plan
from jaxlora.parallel.plan import MESH_AXES, PMAP_AXIS, Plan
from jaxlora.parallel.rules import LINEAR_AXES, RULES, param_logical_axes

__all__ = [
    "LOCAL",
    "Collective",
    "LINEAR_AXES",
    "MESH_AXES",
    "PMAP_AXIS",
    "RULES",
    "Plan",
    "init_distributed",
    "make_plan",
    "param_logical_axes",
    "pmap_collective",
]
