"""`make_plan`: the `Plan` a `ParallelSection` asks for, checked against the devices, batch and model."""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxlora.errors import UserError
from jaxlora.parallel.plan import MESH_AXES, PMAP_AXIS, Plan
from jaxlora.parallel.rules import RULES


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _mesh_sizes(mesh_cfg, n_devices: int) -> tuple[int, int, int, int]:
    fsdp, tensor = mesh_cfg.fsdp, mesh_cfg.tensor
    expert = getattr(mesh_cfg, "expert", 1)  # expert parallelism (MoE models)
    inner = fsdp * expert * tensor
    sizes = f"fsdp={fsdp}" + (f" x expert={expert}" if expert > 1 else "") + f" x tensor={tensor}"
    if mesh_cfg.data == -1:
        if n_devices % inner:
            names = "fsdp x expert x tensor" if expert > 1 else "fsdp x tensor"
            raise UserError(
                f"parallel.mesh {sizes} = {inner} does not divide the "
                f"{n_devices} devices; choose {names} among {_divisors(n_devices)}"
            )
        return n_devices // inner, fsdp, expert, tensor
    data = mesh_cfg.data
    if data * inner != n_devices:
        raise UserError(
            f"parallel.mesh data={data} x {sizes} = {data * inner} devices, "
            f"but there are {n_devices}; make the product {n_devices} or set parallel.mesh.data=-1 "
            "(all devices left over)"
        )
    return data, fsdp, expert, tensor


def _check_batch(batch_size: int, dp: int, what: str) -> None:
    if batch_size % dp:
        lower = batch_size // dp * dp
        options = f"{lower} or {lower + dp}" if lower else f"{dp}"
        raise UserError(
            f"train.batch_size {batch_size} is not divisible by the data-parallel size {dp} ({what}); "
            f"use a multiple of {dp}, e.g. {options}"
        )


def make_plan(
    parallel, batch_size: int, num_kv_heads: int | None = None, devices=None, num_experts: int | None = None
) -> Plan:
    """Build and check the `Plan` for `parallel` (a `ParallelSection`) and a global batch of `batch_size`.

    `num_kv_heads` (the model's) is checked against the tensor-parallel size. `devices` defaults to
    `jax.devices()` (every process's). Raises UserError for a mesh that does not match the device count,
    a batch the data-parallel size does not divide, a tensor size that does not divide the KV heads, or
    an expert size that does not divide `num_experts` (the model's; a dense model refuses expert > 1).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    m = parallel.mesh
    strategy = parallel.strategy
    if strategy == "auto":
        one = n == 1 and m.fsdp == 1 and m.tensor == 1 and getattr(m, "expert", 1) == 1 and m.data in (-1, 1)
        strategy = "single" if one else "mesh"
    if strategy == "single":
        if jax.process_count() > 1:
            raise UserError(
                f"parallel.strategy single runs on one device, but {jax.process_count()} processes were "
                "started; use parallel.strategy mesh or pmap"
            )
        mesh = Mesh(np.array(devices[:1]).reshape(1, 1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 4)
        return Plan("single", mesh, {}, batch_size)
    if strategy == "pmap":
        if m.data not in (-1, n):
            raise UserError(
                f"parallel.mesh.data={m.data}, but parallel.strategy pmap uses all {n} devices; "
                "set parallel.mesh.data=-1 or use parallel.strategy mesh"
            )
        _check_batch(batch_size, n, f"pmap over {n} devices")
        ordered = [d for p in range(jax.process_count()) for d in devices if d.process_index == p]
        return Plan("pmap", Mesh(np.array(ordered), (PMAP_AXIS,)), {}, batch_size)
    data, fsdp, expert, tensor = _mesh_sizes(m, n)
    if num_experts is not None and expert > 1 and num_experts % expert:
        what = f"{num_experts} experts" if num_experts else "no experts (a dense model)"
        raise UserError(
            f"parallel.mesh.expert={expert} needs a mixture-of-experts model whose expert count it divides; "
            f"this model has {what}"
        )
    if num_kv_heads is not None and num_kv_heads % tensor:
        raise UserError(
            f"parallel.mesh.tensor={tensor} does not divide the model's {num_kv_heads} KV heads "
            f"(num_key_value_heads); use a tensor size among {_divisors(num_kv_heads)}"
        )
    rows = f"parallel.mesh data={data} x fsdp={fsdp}: rows split over both"
    if expert > 1:
        rows = f"parallel.mesh data={data} x fsdp={fsdp} x expert={expert}: rows split over all three"
    _check_batch(batch_size, data * fsdp * expert, rows)
    shape = (data, fsdp, expert, tensor)
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 4, devices=devices)
    return Plan("mesh", mesh, RULES, batch_size)
