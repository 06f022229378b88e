"""Which tokens are real, from whatever attention mask the model was called with.

The masked quantizer (``stamp::fake_quant_masked``) takes a ``[batch, seq]`` mask, nonzero =
real token. Models are called with one of:

* an HF padding mask ``[batch, seq]``: integer, bool or float, nonzero = real token (what
  transformers itself reads from a 2-d mask, whatever its dtype);
* a 4-d attention mask ``[batch, 1 or heads, queries, keys]``, as transformers accepts it
  ("custom 4D masks") and SDPA reads it: bool (True = may attend) or float *additive*
  (0 = may attend; ``-inf``, or a large negative value such as the dtype's minimum that HF
  writes, = masked). A key position is a real token when some query may attend to it: a pad
  key is masked for every query (left or right padding, causal or not), a real one at least
  for itself under a causal mask.

:func:`real_tokens` turns either into the ``[batch, keys]`` bool mask; :func:`real_token_node`
inserts that computation into a graph once, after the mask input. A 4-d mask that attends to
every key (packed sequences, a block-diagonal mask) says all tokens are real: packing is not
padding, and the batch is quantized as unpadded.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

__all__ = ["real_tokens", "real_token_node", "MASKED_FLOAT_FRACTION"]

MASKED_FLOAT_FRACTION = 0.5
"""An additive float mask value at or below this fraction of the dtype's most negative value
(or ``-inf``) masks its position: HF writes ``torch.finfo(dtype).min``; biases are far above."""


def real_tokens(mask: Tensor) -> Tensor:
    """``[batch, seq]`` bool, True = real token, from a 2-d padding mask or a 4-d attention
    mask (see the module docstring)."""
    if mask.ndim == 2:
        return mask != 0
    if mask.ndim != 4:
        raise ValueError(
            f"attention_mask must be [batch, seq] or [batch, heads, queries, keys], got "
            f"shape {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        attend = mask
    elif mask.is_floating_point():
        attend = mask > torch.finfo(mask.dtype).min * MASKED_FLOAT_FRACTION
    else:  # an integer 4-d mask: nonzero = may attend, like bool
        attend = mask != 0
    return attend.any(dim=2).any(dim=1)


def real_token_node(gm: fx.GraphModule, mask: fx.Node) -> fx.Node:
    """A node computing :func:`real_tokens` of graph input ``mask`` (the mask itself when it
    is already a 2-d integer/bool mask), inserted once right after it."""
    value = mask.meta.get("example_value", mask.meta.get("val"))
    if value is not None and value.ndim == 2 and not value.is_floating_point():
        return mask
    for user in mask.users:
        if user.op == "call_function" and user.target is real_tokens:
            return user
    with gm.graph.inserting_after(mask):
        node = gm.graph.call_function(real_tokens, (mask,))
    mode = getattr(value, "fake_mode", None)
    if mode is not None:
        with mode:
            node.meta["example_value"] = real_tokens(value)
    return node
