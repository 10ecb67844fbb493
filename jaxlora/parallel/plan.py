"""Devices, meshes and sharding rules: how `train` spreads the one train step over devices and hosts.

The step (`jaxlora.train.step`) is the same function whatever the strategy; a `Plan` decides where its
inputs live and how it is compiled:

  single  one device; `jit`.
  pmap    classic data parallelism over every device: LoRA, optimizer state and base replicated, the batch
          split, gradient sums and token counts `psum`-ed inside the step (`Plan.collective`).
  mesh    `jit` over a `Mesh(data, fsdp, tensor)`: arrays carry `NamedSharding`s from one rules table and
          XLA partitions the step (GSPMD). Base weights, LoRA and optimizer state are sharded, so a model
          too large for one device trains this way.
  auto    single on one device, mesh otherwise.

Sharding rules. Every array dimension has a logical name; `RULES` maps logical names to mesh axes:

    batch   -> (data, fsdp, expert)   rows of every batch
    embed   -> fsdp           the model width D of kernels, embeddings and LoRA A/B (FSDP)
    expert  -> expert         the E axis of MoE expert kernels [L, E, in, out] and their LoRA (expert
                              parallelism: each device holds E / expert experts; it also splits rows)
    q_heads, kv_heads, qkv, mlp, vocab -> tensor   (Megatron-style column / row splits)
    layers, rank, everything else -> replicated

Linear kernels [L, in, out] (`LINEAR_AXES`): q/k/v/gate/up/c_attn/c_fc are split on `out` over tensor
and on `in` (= embed) over fsdp; o_proj/down_proj/c_proj the other way round. Biases follow `out`.
Embedding [V, D] is (vocab, embed), the LM head [D, V] (embed, vocab); norms are replicated. LoRA A
[L, in, r] follows its kernel's `in`, B [L, r, out] its `out`; optimizer state follows its parameter.
A dimension the mesh axis does not divide stays replicated (e.g. a vocabulary of 50257 over tensor=2).

Quantized kernels (`jaxlora.quant.QuantizedTensor`): int8 `data` is sharded like the dense kernel and
its per-column `scale` along `out`; NF4 packed `data` [L, in/2, out] likewise (whole bytes, so `in`
splits stay on byte boundaries); NF4's double-quantized block scales (1/64 of the weights) are replicated.
MXFP4's packed codes [L, in/2, out] shard as NF4's, its uint8 block scales [L, in/32, out] as int8's scale.

Multi-host: `init_distributed` calls `jax.distributed.initialize` from the config or the environment
(SLURM, Open MPI, `JAX_COORDINATOR_ADDRESS`); each process loads the rows of every global batch that its
own devices hold (`Plan.loader_slice`) and `Plan.put_batch` assembles the global array from them.
"""

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlora.errors import UserError
from jaxlora.lora.tokens import layer_groups
from jaxlora.lora.trainable import Adapter
from jaxlora.parallel.collective import LOCAL, Collective, pmap_collective
from jaxlora.parallel.rules import LINEAR_AXES, param_logical_axes
from jaxlora.quant import QuantizedTensor

log = logging.getLogger("jaxlora.parallel")

MESH_AXES = ("data", "fsdp", "expert", "tensor")
PMAP_AXIS = "data"  # the pmap axis name, and the name of its 1-D mesh


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


# ----------------------------------------------------------------------------------------------------
# The plan


@dataclasses.dataclass
class Plan:
    """Where the step's inputs live and how it is compiled (see the module docstring).

    strategy: "single", "pmap" or "mesh"; mesh: `Mesh(data, fsdp, tensor)` (single: one device, pmap:
    a 1-D `data` mesh over every device, as `jax.pmap` builds it); rules: logical name -> mesh axes.

    The training loop talks to a plan through a few calls that hide the strategy: `place_base` and
    `place_train_state` put the weights on devices, `compile_steps` compiles the train and eval steps,
    `loader_slice` and `put_batch` / `put_eval_batch` feed them, and `agree_to_stop`, `to_host` and
    `barrier` keep the processes of a multi-host run in step.
    """

    strategy: str
    mesh: Mesh
    rules: Mapping[str, str | tuple[str, ...]]
    batch_size: int

    # --- facts ----------------------------------------------------------------------------------

    @property
    def collective(self) -> Collective:
        """The step's hooks for combining devices: sums over the pmap axis, else the identity."""
        return pmap_collective(PMAP_AXIS) if self.strategy == "pmap" else LOCAL

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (TensorBoard, metrics, config, exports)."""
        return jax.process_index() == 0

    @property
    def multi_process(self) -> bool:
        return jax.process_count() > 1

    def describe(self) -> str:
        axes = " x ".join(f"{n}={s}" for n, s in self.mesh.shape.items())
        hosts = f", {jax.process_count()} processes" if self.multi_process else ""
        platform = self.mesh.devices.flat[0].platform
        return f"{self.strategy} ({axes}) on {self.mesh.size} {platform} devices{hosts}"

    # --- shardings ------------------------------------------------------------------------------

    def spec(self, logical, shape) -> P:
        """PartitionSpec for an array of `shape` whose dims have the given logical names."""
        out, used = [], set()
        for name, size in zip(logical, shape, strict=True):
            axes = self.rules.get(name, ()) if name else ()
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            axes = tuple(a for a in axes if a not in used and self.mesh.shape[a] > 1)
            if not axes or size % math.prod(self.mesh.shape[a] for a in axes):
                out.append(None)  # nothing to split, or not divisible: replicated along this dim
                continue
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        while out and out[-1] is None:
            out.pop()
        return P(*out)

    def sharding(self, logical, shape) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical, shape))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def param_shardings(self, params: dict) -> dict:
        """NamedShardings for the decoder's params tree (QuantizedTensors get one per array field)."""

        def visit(path, node):
            if isinstance(node, dict):
                return {k: visit(path + (k,), v) for k, v in node.items()}
            logical = param_logical_axes(path, len(node.shape))
            if isinstance(node, QuantizedTensor):
                return self._quantized(node, logical)
            return self.sharding(logical, node.shape)

        return visit((), params)

    def _quantized(self, q: QuantizedTensor, logical) -> QuantizedTensor:
        lead, fan_out = logical[:-2], logical[-1]
        fields = {
            "data": self.sharding(logical, q.data.shape),  # [..., in (or in/2 packed), out]
            "scale": None if q.scale is None else self.sharding(lead + (None, fan_out), q.scale.shape),
        }
        for name in ("scale_codes", "scale_absmax", "scale_mean"):  # NF4 double quantization: small
            fields[name] = None if getattr(q, name) is None else self.replicated
        return dataclasses.replace(q, **fields)

    def lora_shardings(self, lora: dict | Adapter) -> dict | Adapter:
        """A [L, in, r] follows its kernel's `in`, B [L, r, out] its `out` (an `Adapter`: both halves)."""
        if isinstance(lora, Adapter):
            return Adapter.split(self.lora_shardings(lora.tree()))
        layers = layer_groups(lora)  # token rows, embedding / LM head copies: replicated
        out = {k: jax.tree.map(lambda _: self.replicated, v) for k, v in lora.items() if k not in layers}
        for group, mods in layers.items():
            for name, ab in mods.items():
                *lead, fan_in, fan_out = LINEAR_AXES[(group, name)]  # lead: ("expert",) for MoE experts
                out.setdefault(group, {})[name] = {
                    "a": self.sharding(("layers", *lead, fan_in, "rank"), ab["a"].shape),
                    "b": self.sharding(("layers", *lead, "rank", fan_out), ab["b"].shape),
                    **{k: self.sharding(("layers", fan_out), ab[k].shape) for k in ("m", "bias") if k in ab},
                    **({"s": self.replicated} if "s" in ab else {}),
                }
        return out

    def like_shardings(self, tree, ref, ref_shardings):
        """Shardings for `tree` (an optimizer state) whose leaves mirror `ref`'s leaves (mu, nu, ...).

        A leaf whose key path ends with a `ref` leaf's path and has its shape takes that leaf's sharding;
        other leaves (step counts) are replicated.
        """
        table = {}
        for (path, leaf), s in zip(
            jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(ref_shardings), strict=True
        ):
            table[_path_keys(path)] = (tuple(leaf.shape), s)

        def pick(path, leaf):
            keys = _path_keys(path)
            for i in range(len(keys)):
                hit = table.get(keys[i:])
                if hit is not None and hit[0] == tuple(leaf.shape):
                    return hit[1]
            return self.replicated

        return jax.tree_util.tree_map_with_path(pick, tree)

    # --- placing arrays -------------------------------------------------------------------------

    def place(self, tree, shardings):
        """Arrays of `tree` (host or one device; the same values on every process) put on `shardings`."""

        def put(x, s):
            if s.is_fully_addressable:
                return jax.device_put(x, s)
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

        return jax.tree.map(put, tree, shardings)

    def replicate(self, x):
        """One array (the same on every process) replicated on every device of the plan."""
        return self.place(x, self.replicated)

    def place_base(self, params: dict) -> dict:
        """The base weights (host or one device) placed on their `param_shardings`."""
        return self.place(params, self.param_shardings(params))

    def place_train_state(self, adapter: Adapter, opt_init: Callable) -> tuple[Adapter, Any]:
        """The adapter placed on its `lora_shardings`, and `opt_init(adapter.trainable)` built in place: each
        optimizer leaf (mu, nu, ...) takes its parameter's sharding (`like_shardings`), step counts are
        replicated."""
        adapter_s = self.lora_shardings(adapter)
        train, train_s = adapter.trainable, adapter_s.trainable
        opt_s = self.like_shardings(jax.eval_shape(opt_init, train), train, train_s)
        adapter = self.place(adapter, adapter_s)
        return adapter, jax.jit(opt_init, out_shardings=opt_s)(adapter.trainable)

    def host_loading(self):
        """Context for loading the base model: into host memory when it will be sharded over accelerators
        (so a model larger than one device can be loaded), else onto the default device."""
        if self.mesh.size > 1 and jax.default_backend() != "cpu":
            return jax.default_device(jax.local_devices(backend="cpu")[0])
        return contextlib.nullcontext()

    def loader_slice(self) -> tuple[int, int]:
        """`(process_index, process_count)` for `BatchLoader`: this process reads rows
        `[index * B / count, (index + 1) * B / count)` of each global batch, the rows its devices hold."""
        if self.strategy == "pmap":
            return jax.process_index(), jax.process_count()
        s = self.sharding(("batch",), (self.batch_size,))
        rows = set()
        for idx in s.addressable_devices_indices_map((self.batch_size,)).values():
            rows.update(range(self.batch_size)[idx[0]])
        lo, n = min(rows), len(rows)
        if rows != set(range(lo, lo + n)) or lo % n or self.batch_size % n:
            raise UserError(
                f"this process's devices hold batch rows {sorted(rows)[:8]}..., not one contiguous block; "
                "order the mesh so each host's devices share data-parallel indices"
            )
        return lo // n, self.batch_size // n

    def put_batch(self, local: dict) -> dict:
        """This process's rows `{key: [A, b, T]}` (stacked micro-batches) -> the step's batch argument:
        a global [A, B, T] array sharded over (data, fsdp), or for pmap [devices, A, B/devices, T]."""
        if self.strategy == "pmap":
            n = jax.local_device_count()
            return {k: np.moveaxis(v.reshape(v.shape[0], n, -1, v.shape[-1]), 1, 0) for k, v in local.items()}
        return {k: self._global_rows(v, 1) for k, v in local.items()}

    def put_eval_batch(self, local: dict) -> dict:
        """This process's rows `{key: [b, T]}` of one evaluation batch -> the eval step's batch argument."""
        if self.strategy == "pmap":
            n = jax.local_device_count()
            return {k: v.reshape(n, -1, v.shape[-1]) for k, v in local.items()}
        return {k: self._global_rows(v, 0) for k, v in local.items()}

    def _global_rows(self, v: np.ndarray, axis: int) -> jax.Array:
        """A global array from this process's rows of it, rows (dim `axis`) sharded over (data, fsdp)."""
        shape = v.shape[:axis] + (self.batch_size,) + v.shape[axis + 1 :]
        logical = (None,) * axis + ("batch",) + (None,) * (v.ndim - axis - 1)
        return jax.make_array_from_process_local_data(self.sharding(logical, shape), v, shape)

    # --- compiling ------------------------------------------------------------------------------

    def compile_train_step(self, step_fn, lora_s, opt_s, base_s, extra_s=()):
        """`step_fn(lora, opt_state, base, batch, rng, lora_scale, *extra)` compiled for this plan, with the
        LoRA and optimizer buffers donated; returns state with the given shardings and replicated metrics.

        `extra_s`: the shardings of each extra argument (frozen array trees the step reads, e.g. DPO's
        reference adapter), one tree per argument; under pmap every extra argument is replicated."""
        extra_s = tuple(extra_s)
        if self.strategy == "pmap":
            pmapped = jax.pmap(
                step_fn,
                axis_name=PMAP_AXIS,
                in_axes=(None, None, None, 0, None, None) + (None,) * len(extra_s),
                out_axes=(None, None, None),
                donate_argnums=(0, 1),
            )
            if not self.multi_process:
                return pmapped

            def step(*args):  # multi-host pmap hands back host-local arrays: keep the state global
                lora, opt, metrics = pmapped(*args)
                lora, opt = multihost_utils.host_local_array_to_global_array((lora, opt), self.mesh, P())
                return lora, opt, metrics

            return step
        batch_s = self.sharding((None, "batch", None), (1, self.batch_size, 1))
        rep = self.replicated
        return jax.jit(
            step_fn,
            in_shardings=(lora_s, opt_s, base_s, batch_s, rep, rep, *extra_s),
            out_shardings=(lora_s, opt_s, rep),
            donate_argnums=(0, 1),
        )

    def compile_eval_step(self, eval_fn, lora_s, base_s, extra_s=()):
        """`eval_fn(lora, base, batch [B, T], lora_scale, *extra) -> (loss_sum, count)` compiled for this
        plan; `extra_s` as for `compile_train_step`."""
        extra_s = tuple(extra_s)
        if self.strategy == "pmap":
            in_axes = (None, None, 0, None) + (None,) * len(extra_s)
            return jax.pmap(eval_fn, axis_name=PMAP_AXIS, in_axes=in_axes, out_axes=None)
        batch_s = self.sharding(("batch", None), (self.batch_size, 1))
        rep = self.replicated
        return jax.jit(eval_fn, in_shardings=(lora_s, base_s, batch_s, rep, *extra_s), out_shardings=rep)

    def compile_steps(
        self, train_step, eval_step, base, lora, opt_state, extra: tuple = ()
    ) -> tuple[Callable, Callable]:
        """Both steps compiled for this plan (`compile_train_step`, `compile_eval_step`), for state that
        `place_base` and `place_train_state` placed: the shardings are read off those arrays. `extra`: more
        placed trees that both steps take after `lora_scale`, in order (their shardings are read off them).
        """
        base_s, lora_s, opt_s, *extra_s = (
            jax.tree.map(lambda x: x.sharding, t) for t in (base, lora, opt_state, *extra)
        )
        return (
            self.compile_train_step(train_step, lora_s, opt_s, base_s, extra_s),
            self.compile_eval_step(eval_step, lora_s, base_s, extra_s),
        )

    # --- host side ------------------------------------------------------------------------------

    def to_host(self, tree):
        """Numpy copies of the full (global) values, on every process (a collective when multi-host)."""
        if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
            return jax.device_get(tree)
        return multihost_utils.process_allgather(tree, tiled=True)

    def agree(self, flag: int) -> int:
        """The largest of `flag` over all processes (e.g. a stop signal one host received)."""
        if not self.multi_process:
            return flag
        return int(np.max(multihost_utils.process_allgather(np.int32(flag))))

    def agree_to_stop(self, received: int, hosts_wait: bool) -> bool:
        """Whether to stop after this step, given the signal this process `received` (0 if none).

        One process stops at once. Several stop together, and only where `hosts_wait` (an interval where
        they synchronize anyway), so that they all save the same step.
        """
        if not self.multi_process:
            return bool(received)
        return hosts_wait and bool(self.agree(received))

    def barrier(self, name: str) -> None:
        """Wait until every process gets here (no-op on one process)."""
        if self.multi_process:
            multihost_utils.sync_global_devices(name)
