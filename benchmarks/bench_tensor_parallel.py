"""Does STaMP give the same model, and what does it cost, under tensor parallelism (issue 16)?

Run with torchrun, one process per GPU (NCCL) or, with ``--quick``, two CPU processes (gloo):

    torchrun --nproc-per-node 4 -m benchmarks.bench_tensor_parallel --json out.json
    torchrun --nproc-per-node 2 -m benchmarks.bench_tensor_parallel --quick

Workload: prefill of a Llama-3-70B-shaped decoder stack (hidden 8192, intermediate 28672, 64
heads, 8 KV heads; ``--layers`` of the 80, default 2; vocab 128 so the LM head does not
dominate), bf16, batch ``--batch`` x ``--seq`` tokens, random weights from one seed on every
rank. Sharded with ``torch.distributed.tensor.parallel.parallelize_module`` and torchtitan's
plan (q/k/v/gate/up colwise, o/down rowwise). Each rank first runs the *unsharded* model,
compiled with the same options on its own GPU, as the oracle (so the stack must fit on one GPU).

One row per configuration (``--configs``; the options of ``torch.compile(model,
backend="stamp", options=...)``): ``none`` ``{}``, ``hadamard``, ``hadamard_kv``. Columns: TP
degree; sites quantized and how many of them all-reduce their ranges (``reduce``) or gather
their features (``gather``, :func:`stamp_fx.sharding.shard_strategy`); median latency of
``backend="inductor"`` on the same sharded model and of ``backend="stamp"``, their ratio;
``max|TP-1|``: the largest difference between the TP output and the one-GPU stamp output (bf16:
the row-parallel partial sums add in another order, so a few 4-bit codes may move by one step);
``max|stamp-fp|``: the quantization effect itself, for scale.

NVLink multicast stays off (NCCL NVLS, symmetric memory multicast, NVSHMEM NVLS), as the lent
machines require: set below before torch.distributed starts.
"""

from __future__ import annotations

import os

for _key, _value in {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.harness import base_parser, emit, time_ms  # noqa: E402
from stamp_fx import StampCompiler  # noqa: E402

CONFIGS = {
    "none": {},
    "hadamard": {"feature_transform": "hadamard"},
    "hadamard_kv": {"feature_transform": "hadamard", "quantize_kv": True},
}
PLAN = {
    **{f"self_attn.{p}_proj": "colwise" for p in "qkv"},
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}


def _model(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.quick:
        sizes = dict(hidden_size=64, intermediate_size=224, num_attention_heads=8,
                     num_key_value_heads=4)  # fmt: skip
    else:
        sizes = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                     num_key_value_heads=8)  # fmt: skip
    cfg = LlamaConfig(vocab_size=128, num_hidden_layers=args.layers, max_position_embeddings=
                      max(4096, args.seq), attn_implementation="sdpa", **sizes)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype).eval()


def _run(model, ids, backend):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        out = compiled(input_ids=ids).logits
    return compiled, out


def _strategies(compiler: StampCompiler) -> dict[str, int]:
    """Sites (not nodes: a graph may be compiled more than once) per sharded strategy."""
    sites = {"reduce": set(), "gather": set()}
    for rec in compiler.records:
        for node in rec.graph.graph.nodes:
            name = str(node.target)
            kind = "reduce" if name.startswith("stamp.fake_quant_sharded") else None
            kind = "gather" if name.startswith("stamp.fake_quant_gathered") else kind
            if kind is not None:
                sites[kind].update(node.meta["stamp"].sites)
    return {k: len(v) for k, v in sites.items()}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    if args.quick:
        args.seq, args.layers = min(args.seq, 64), min(args.layers, 2)
    cuda = not args.quick and torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    ids = torch.randint(0, 128, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    rows = []
    for name in args.configs:
        options = CONFIGS[name] if not args.quick else {**CONFIGS[name], "high_tokens": 8}
        model = _model(args, device, dtype)
        _, fp = _run(model, ids, "inductor")
        _, one = _run(model, ids, StampCompiler.from_options(options))
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        mesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
        for layer in model.model.layers:
            parallelize_module(layer, mesh, {k: styles[v]() for k, v in PLAN.items()})
        base, _ = _run(model, ids, "inductor")
        base_ms = time_ms(lambda base=base: base(input_ids=ids), device=device)
        compiler = StampCompiler.from_options(options)
        stamp, tp = _run(model, ids, compiler)
        stamp_ms = time_ms(lambda stamp=stamp: stamp(input_ids=ids), device=device)
        counts = _strategies(compiler)
        rows.append([
            name, world, len(compiler.merged_plan().sites), counts["reduce"], counts["gather"],
            f"{base_ms:.2f}", f"{stamp_ms:.2f}", f"{stamp_ms / base_ms:.2f}x",
            f"{(tp.float() - one.float()).abs().max().item():.3g}",
            f"{(one.float() - fp.float()).abs().max().item():.3g}",
        ])  # fmt: skip
        del model, base, stamp
    if rank == 0:
        emit(
            f"STaMP under tensor parallelism (Llama-3-70B-shaped, {args.layers} layers, "
            f"batch {args.batch} x {args.seq} tokens, TP {world})",
            [
                "config",
                "TP",
                "sites",
                "reduce",
                "gather",
                "inductor ms",
                "stamp ms",
                "ratio",
                "max|TP-1|",
                "max|stamp-fp|",
            ],  # fmt: skip
            rows,
            device=device,
            json_path=args.json,
            extra={"args": vars(args) | {"json": str(args.json)}},
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
