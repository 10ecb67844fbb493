"""The NNX facade: same logits as the functional core; filters separate LoRA from the frozen base."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlora.lora import LoraConfig, count_params
from jaxlora.models import forward, load_model
from jaxlora.nnx import CausalLM, FrozenWeight, LoraWeight


def test_nnx_module_matches_functional_and_trains_only_lora(stories_dir):
    ids = jnp.asarray([[1, 403, 407, 261, 378, 432, 383, 286]])
    model = CausalLM.from_pretrained(stories_dir)
    ref = load_model(stories_dir)
    np.testing.assert_array_equal(model(ids), forward(ref.params, ref.config, ids))

    lcfg = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    model.add_lora(lcfg, seed=0)
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 0  # nothing hides behind a Param filter
    lora_state = nnx.state(model, LoraWeight)
    # q_proj 64 -> 64 and v_proj 64 -> 32 on 5 layers at r = 4: A is [5, 64, 4], B is [5, 4, out].
    assert count_params(jax.tree.leaves(lora_state)) == 5 * 4 * (64 + 64) + 5 * 4 * (64 + 32)
    with jax.disable_jit():  # op by op: compiled, the two programs may differ in float32's last bits
        np.testing.assert_array_equal(model(ids), forward(ref.params, ref.config, ids))  # B = 0

    base_before = jax.tree.map(np.asarray, nnx.state(model, FrozenWeight))
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=LoraWeight)

    def loss_fn(m):
        logp = jax.nn.log_softmax(m(ids)[:, :-1])
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    losses = []
    for _ in range(3):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LoraWeight))(model)
        opt.update(model, grads)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    after = jax.tree.map(np.asarray, nnx.state(model, FrozenWeight))
    jax.tree.map(np.testing.assert_array_equal, base_before, after)
