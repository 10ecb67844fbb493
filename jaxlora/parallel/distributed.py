"""Multi-host start-up: `jax.distributed.initialize` from the config or the launcher's environment."""

import logging
import os

import jax

from jaxlora.errors import UserError

log = logging.getLogger("jaxlora.parallel")


def _cluster_process_count() -> int:
    """Processes a launcher started for this job (1 when none is detected)."""
    env = os.environ
    if "SLURM_STEP_NODELIST" in env and "SLURM_PROCID" in env:  # inside `srun`
        return int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    if "OMPI_COMM_WORLD_SIZE" in env:
        return int(env["OMPI_COMM_WORLD_SIZE"])
    return 1


def init_distributed(dist) -> bool:
    """Join the other processes of a multi-host run (`jax.distributed.initialize`). Returns whether it did.

    `dist` is a `DistributedSection`: `enabled` true always initializes (fields left null are detected by
    JAX from SLURM, Open MPI, Kubernetes or `JAX_COORDINATOR_ADDRESS`), false never, null when any field
    is set, `JAX_COORDINATOR_ADDRESS` is set, or a launcher started more than one process. Call it before
    anything touches the devices; a second call in the same process does nothing.
    """
    if jax.distributed.is_initialized():
        return True
    fields = (dist.coordinator_address, dist.num_processes, dist.process_id)
    enabled = dist.enabled
    if enabled is None:
        enabled = (
            any(f is not None for f in fields)
            or "JAX_COORDINATOR_ADDRESS" in os.environ
            or _cluster_process_count() > 1
        )
    if not enabled:
        return False
    try:
        jax.distributed.initialize(
            coordinator_address=dist.coordinator_address,
            num_processes=dist.num_processes,
            process_id=dist.process_id,
        )
    except (ValueError, TypeError) as err:
        raise UserError(
            f"parallel.distributed: cannot start multi-host JAX ({err}); set coordinator_address, "
            "num_processes and process_id, or launch with srun/mpirun"
        ) from None
    log.info("process %d of %d joined", jax.process_index(), jax.process_count())
    return True
