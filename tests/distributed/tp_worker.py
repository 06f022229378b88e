"""What each gloo rank runs for test_tensor_parallel.py (spawned processes import this module).

Every worker first computes the oracle: the same tiny Llama, built from the same seed, compiled
with ``backend="stamp"`` in this process alone (no parallelism). Then it shards the model over
the ranks, compiles it again and returns both outputs with what the compile did.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from stamp_fx import StampCompiler
from tests import models

LLAMA = {"hidden": 64, "heads": 4, "kv_heads": 2, "seq": 16, "batch": 2}
"""hidden 64 over 2 ranks: 32 features a shard, so the default Hadamard block (64) spans the
shards (o_proj) while down_proj's 128 features keep whole blocks on each rank."""

# torchtitan's plan for a Llama block (input replicated, row-parallel outputs all-reduced).
TP_PLAN = {
    **{f"self_attn.{p}_proj": "colwise" for p in "qkv"},
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}


def _compile_run(model, inputs, options):
    compiler = StampCompiler.from_options(options)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = torch.compile(model, backend=compiler)(**inputs)
    out = out if isinstance(out, torch.Tensor) else models.main_output(out)
    plan = compiler.merged_plan()
    ops: dict[str, int] = {}
    for rec in compiler.records:
        for node in rec.graph.graph.nodes:
            name = str(node.target)
            if name.startswith("stamp."):
                ops[name] = ops.get(name, 0) + 1
    return {
        "out": out.detach().clone(),
        "sites": {k: p.describe() for k, p in plan.sites.items()},
        "skipped": dict(plan.skipped),
        "ops": ops,
        "warnings": [str(w.message) for w in caught],
    }


def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def parallelize_module_vs_single(rank, world, options, dtype):
    """torch.distributed.tensor.parallel.parallelize_module (DTensor inputs)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model, inputs = models.llama(**LLAMA)
    model = model.to(dtype)
    single = _compile_run(model, inputs, options)
    mesh = _mesh(world)
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for layer in model.model.layers:
        parallelize_module(layer, mesh, {k: styles[v]() for k, v in TP_PLAN.items()})
    return {"single": single, "tp": _compile_run(model, inputs, options)}


def tp_plan_vs_single(rank, world, options, dtype, checkpoint_dir):
    """transformers' own tensor parallelism: from_pretrained(..., tp_plan="auto")."""
    from transformers import LlamaForCausalLM

    model, inputs = models.llama(**LLAMA)
    if rank == 0:
        model.save_pretrained(checkpoint_dir)
    dist.barrier()
    single_model = LlamaForCausalLM.from_pretrained(checkpoint_dir, dtype=dtype).eval()
    single = _compile_run(single_model, inputs, options)
    tp_model = LlamaForCausalLM.from_pretrained(checkpoint_dir, dtype=dtype, tp_plan="auto")
    return {"single": single, "tp": _compile_run(tp_model.eval(), inputs, options)}


class _Blocks(torch.nn.Module):
    """One MLP inside a ModuleList, so its linears are in-block sites (``layers.0.*``)."""

    def __init__(self, mlp):
        super().__init__()
        self.layers = torch.nn.ModuleList([mlp])

    def forward(self, x):
        return self.layers[0](x)


def sequence_parallel_mlp(rank, world):
    """torchtitan's sequence-parallel MLP: tokens split across ranks at the MLP input, gathered
    by ColwiseParallel(input_layouts=Shard(1)); the row-parallel output reduce-scattered back."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model, _ = models.llama(**LLAMA)
    blocks = _Blocks(model.model.layers[0].mlp).double()
    mesh = _mesh(world)
    parallelize_module(blocks.layers[0], mesh, {
        "gate_proj": ColwiseParallel(input_layouts=Shard(1)),
        "up_proj": ColwiseParallel(input_layouts=Shard(1)),
        "down_proj": RowwiseParallel(output_layouts=Shard(1)),
    })  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, LLAMA["hidden"], generator=gen, dtype=torch.float64)
    local = x.chunk(world, dim=1)[rank]  # this rank's tokens
    with torch.no_grad():
        eager = blocks(local)
    got = _compile_run(blocks, {"x": local}, {"inductor": False})
    return {"eager": eager, **got}
