"""transformers' greedy `generate`, the reference the generation and rollout tests compare with."""

import numpy as np
import torch


def hf_greedy(hf, ids, mask, new: int, eos: int | None = None, pad: int = 0, **kw) -> np.ndarray:
    """Greedy `generate` on the left-padded batch ids, mask [B, T]: the new tokens [B, <= new], `pad`
    after a row's EOS (eos None: every row runs `new` tokens); `kw` go to `generate` (repetition_penalty)."""
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
            do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=pad, **kw,
        )  # fmt: skip
    return out[:, ids.shape[1] :].numpy()
