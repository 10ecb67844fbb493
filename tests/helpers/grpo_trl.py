"""TRL 1.16's real `GRPOTrainer` as the reference of tests/test_grpo.py: built on a tiny transformers model
with a PEFT LoRA (its weights those of a jaxlora adapter), its settings changed between cases as its
`__init__` copies them from `GRPOConfig`, its rollouts (`_generate_and_score_completions`) and its loss,
gradients and metrics (`compute_loss`) on the inputs a rollout returns."""

from pathlib import Path

import numpy as np
import torch

# GRPOConfig fields that GRPOTrainer.__init__ copies onto the trainer (under the same name unless noted)
MIRRORED = {
    **{name: name for name in ("loss_type", "beta", "importance_sampling_level", "off_policy_mask_threshold",
                               "max_completion_length", "scale_rewards", "multi_objective_aggregation",
                               "mask_truncated_completions", "num_iterations", "top_entropy_quantile",
                               "entropy_coef")},
    "epsilon": "epsilon_low",
}  # fmt: skip
DEFAULTS = {
    "loss_type": "dapo", "beta": 0.0, "importance_sampling_level": "token", "off_policy_mask_threshold": None,
    "scale_rewards": "group", "multi_objective_aggregation": "sum_then_normalize", "epsilon": 0.2,
    "mask_truncated_completions": False, "num_iterations": 1, "epsilon_high": None, "delta": None,
    "use_bias_correction_kl": True, "top_entropy_quantile": 1.0, "entropy_coef": 0.0,
}  # fmt: skip


def build_trainer(folder: Path, adapter: Path, reward_fns, weights, out: Path, **config):
    """A `GRPOTrainer` on the transformers model in `folder` (float32, eager attention) with a PEFT LoRA
    loaded from `adapter`; `config` goes to `GRPOConfig`. EOS: the model's generation config's."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    lcfg = LoraConfig.from_pretrained(adapter)
    lcfg.inference_mode = False
    args = GRPOConfig(output_dir=str(out), report_to=[], use_cpu=True, bf16=False, reward_weights=weights,
                      **config)  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=list(reward_fns), args=args, peft_config=lcfg,
                          train_dataset=_dataset())  # fmt: skip
    loaded = set_peft_model_state_dict(trainer.model, load_file(adapter / "adapter_model.safetensors"))
    assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if "lora_" in k]
    trainer.model.train()  # train mode (LoRA dropout is 0): TRL logs under "train"
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["unused"]})


def configure(trainer, **settings) -> None:
    """Set GRPOConfig fields on `trainer.args` and their copies on the trainer, as `__init__` makes them
    (the defaults for every field not given)."""
    settings = {**DEFAULTS, **settings}
    for name, value in settings.items():
        assert hasattr(trainer.args, name), name
        setattr(trainer.args, name, value)
        if name in MIRRORED:
            assert hasattr(trainer, MIRRORED[name]), MIRRORED[name]
            setattr(trainer, MIRRORED[name], value)
    eps_high = settings["epsilon_high"]
    trainer.epsilon_high = settings["epsilon"] if eps_high is None else eps_high
    trainer._entropy_bonus_enabled = settings["entropy_coef"] != 0.0  # static control: no adaptive entropy


def rollout(trainer, rows: list[dict], seed: int = 0) -> tuple[dict, dict, dict]:
    """(the inputs `_generate_and_score_completions` returns for `rows`, its metrics {name: value}, its
    logged prompts, completions and rewards per function), sampling with torch seeded by `seed`."""
    trainer._metrics["train"].clear()
    for key in ("prompt", "completion", "advantages"):
        trainer._logs[key].clear()
    trainer._logs["rewards"].clear()
    torch.manual_seed(seed)
    out = trainer._generate_and_score_completions([dict(r) for r in rows])
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    logs = {"prompt": list(trainer._logs["prompt"]), "completion": list(trainer._logs["completion"]),
            "rewards": {k: list(v) for k, v in trainer._logs["rewards"].items()}}  # fmt: skip
    return out, metrics, logs


def loss_and_grads(trainer, inputs: dict, accumulation: int = 1) -> tuple[float, dict, dict]:
    """(loss, {PEFT tensor name: gradient}, {metric: value of the last micro-batch}) of `compute_loss`
    and its backward, with the batch split into `accumulation` micro-batches as TRL's gradient
    accumulation does (steps_per_generation = gradient_accumulation_steps, TRL's default)."""
    trainer._metrics["train"].clear()
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.args.steps_per_generation = accumulation
    total = 0.0
    for part in _split(inputs, accumulation):
        loss = trainer.compute_loss(trainer.model, part)
        loss.backward()
        total += loss.item()
    trainer.current_gradient_accumulation_steps = trainer.args.steps_per_generation = 1
    grads = {
        n.replace(".default", ""): p.grad.numpy().copy()
        for n, p in trainer.model.named_parameters()
        if p.grad is not None
    }
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return total, grads, metrics


def _split(inputs: dict, n: int) -> list[dict]:
    """TRL's `split_tensor_dict` without its shuffle: n consecutive parts of every per-completion tensor."""
    rows = inputs["completion_ids"].shape[0]
    size = rows // n
    return [
        {k: v[i * size : (i + 1) * size] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v
         for k, v in inputs.items()}
        for i in range(n)
    ]  # fmt: skip


def completion_lists(out: dict, eos_ids) -> list[list[int]]:
    """Each completion's token ids through its first EOS, or all of them (the rollout's unpadded lists;
    its mask may be zeroed by mask_truncated_completions)."""
    lists = []
    for row in out["completion_ids"].numpy().tolist():
        stop = next((i for i, t in enumerate(row) if t in eos_ids), len(row) - 1)
        lists.append(row[: stop + 1])
    return lists


def with_old_logps(out: dict, noise: float, seed: int = 1) -> torch.Tensor:
    """The sampler's log-probs as if the policy had moved since: the rollout's plus Gaussian noise."""
    g = np.random.default_rng(seed)
    old = out["old_per_token_logps"].numpy()
    return torch.tensor(old + noise * g.standard_normal(old.shape).astype(np.float32))
