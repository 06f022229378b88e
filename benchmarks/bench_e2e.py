"""What does STaMP cost end to end? backend="stamp" versus backend="inductor", same run.

Two workloads with random weights (the cost does not depend on the values):

* prefill of a Llama-3-8B-shaped decoder stack (transformers ``LlamaConfig``: hidden 4096,
  intermediate 14336, 32 heads, 8 KV heads, vocab 128 so the LM head does not dominate), bf16,
  batch 1 and 4, S = 2048; as many layers as fit comfortably (``--layers``, default: up to the
  real 32 while the weights take at most a quarter of the free GPU memory);
* one denoising step of a PixArt-Sigma-shaped DiT (28 blocks, hidden 1152 = 16 heads x 72,
  MLP 4608, 4096 image tokens from a 128 x 128 latent with patch 2, cross-attention to 300
  text tokens of width 4096), bf16, batch ``--dit-batch``. It is diffusers'
  ``PixArtTransformer2DModel`` when diffusers is installed, else an equivalent stack written
  here in plain PyTorch (F.linear + SDPA self- and cross-attention with the same shapes,
  adaLN-single modulation); the table says which.

``stamp`` is the paper's setting with this project's defaults (Haar along the sequence, levels
chosen so 64 transformed tokens sit at 8 bits, the rest at 4, one attention-sink token for the
causal LM) lowered with ``--kernel`` (default ``triton``: the hand-written fused kernel, the
``inductor`` decomposition where it does not apply). Columns: median latency of each backend
and their ratio, then the cold compile time of each (fresh Dynamo state, Inductor caches off
and a new cache directory) and their ratio. Targets (issue): latency ratio <= 1.05, compile
time ratio <= 1.5.

    python -m benchmarks.bench_e2e --quick        # tiny models, seconds on a CPU
    python -m benchmarks.bench_e2e --json e2e.json
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.harness import base_parser, emit, time_ms
from stamp_fx import StampCompiler, StampConfig


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cold_compile(model: nn.Module, inputs: dict, backend, device: str):
    """Compile ``model`` with ``backend`` from cold; returns (compiled, seconds of the first call)."""
    torch._dynamo.reset()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="stamp_e2e_")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        start = time.perf_counter()
        compiled(**inputs)
        _sync(device)
        seconds = time.perf_counter() - start
    return compiled, seconds


# -- Llama ------------------------------------------------------------------------------------


def llama_stack(layers: int, *, quick: bool, device: str, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if quick:
        sizes = dict(
            hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2
        )
    else:
        sizes = dict(
            hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8
        )
    cfg = LlamaConfig(
        vocab_size=128, num_hidden_layers=layers, max_position_embeddings=8192, **sizes
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialise on the device: 8B-sized layers are slow on a CPU
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def llama_layer_bytes(dtype: torch.dtype) -> int:
    h, i, kv = 4096, 14336, 1024
    params = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return params * torch.finfo(dtype).bits // 8


def default_layers(device: str, dtype: torch.dtype) -> int:
    if not device.startswith("cuda"):
        return 2
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(32, int(0.25 * free // llama_layer_bytes(dtype))))


# -- DiT --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTShape:
    layers: int = 28
    heads: int = 16
    head_dim: int = 72
    latent: int = 128  # latent side; tokens = (latent / patch)**2
    patch: int = 2
    text_tokens: int = 300
    caption_channels: int = 4096
    in_channels: int = 4

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


PIXART_SIGMA = DiTShape()
TINY_DIT = DiTShape(layers=2, heads=2, head_dim=16, latent=16, text_tokens=8, caption_channels=32)


class DiTBlock(nn.Module):
    """PixArt block: adaLN-single modulated self-attention, cross-attention, GELU MLP."""

    def __init__(self, s: DiTShape):
        super().__init__()
        h = s.hidden
        self.heads = s.heads
        self.scale_shift_table = nn.Parameter(torch.randn(6, h) / h**0.5)
        self.norm1 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(h, h) for _ in range(4))
        self.cross_q, self.cross_k, self.cross_v, self.cross_out = (
            nn.Linear(h, h) for _ in range(4)
        )
        self.norm2 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def _attn(self, q, k, v):
        b, n, h = q.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).reshape(b, n, h)

    def forward(self, x, text, t6):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t6.view(x.shape[0], 6, -1)
        ).chunk(6, dim=1)
        y = self.norm1(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.to_out(self._attn(self.to_q(y), self.to_k(y), self.to_v(y)))
        x = x + self.cross_out(self._attn(self.cross_q(x), self.cross_k(text), self.cross_v(text)))
        y = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.fc2(F.gelu(self.fc1(y), approximate="tanh"))


class PlainDiT(nn.Module):
    """A PixArt-shaped DiT in plain PyTorch (used when diffusers is not installed)."""

    def __init__(self, s: DiTShape):
        super().__init__()
        h = s.hidden
        self.s = s
        self.patch_embed = nn.Linear(s.in_channels * s.patch**2, h)
        self.caption_projection = nn.Sequential(
            nn.Linear(s.caption_channels, h), nn.GELU(approximate="tanh"), nn.Linear(h, h)
        )
        self.time_embed = nn.Sequential(nn.Linear(256, h), nn.SiLU(), nn.Linear(h, h))
        self.adaln_single = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))
        self.transformer_blocks = nn.ModuleList(DiTBlock(s) for _ in range(s.layers))
        self.proj_out = nn.Linear(h, 2 * s.in_channels * s.patch**2)

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        s, b = self.s, hidden_states.shape[0]
        side = s.latent // s.patch
        patches = hidden_states.unfold(2, s.patch, s.patch).unfold(3, s.patch, s.patch)
        x = self.patch_embed(patches.permute(0, 2, 3, 1, 4, 5).reshape(b, side * side, -1))
        freqs = torch.exp(-math.log(10000) * torch.arange(128, device=x.device) / 128)
        args = timestep[:, None].float() * freqs[None]
        temb = self.time_embed(torch.cat([args.cos(), args.sin()], -1).to(x.dtype))
        t6 = self.adaln_single(temb)
        text = self.caption_projection(encoder_hidden_states)
        for block in self.transformer_blocks:
            x = block(x, text, t6)
        return (self.proj_out(x),)


def dit_model(*, quick: bool, device: str, dtype: torch.dtype, layers: int | None = None):
    """(model, shape, description, is_diffusers)."""
    s = TINY_DIT if quick else PIXART_SIGMA
    if layers:
        s = replace(s, layers=layers)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            try:
                from diffusers import PixArtTransformer2DModel
            except ImportError:
                model, kind, is_diffusers = PlainDiT(s), "plain PyTorch (diffusers absent)", False
            else:
                model = PixArtTransformer2DModel(
                    sample_size=s.latent, patch_size=s.patch, in_channels=s.in_channels,
                    out_channels=2 * s.in_channels, num_layers=s.layers, num_attention_heads=s.heads,
                    attention_head_dim=s.head_dim, cross_attention_dim=s.hidden,
                    caption_channels=s.caption_channels, norm_type="ada_norm_single",
                    use_additional_conditions=False,
                )  # fmt: skip
                kind, is_diffusers = "diffusers PixArtTransformer2DModel", True
    finally:
        torch.set_default_dtype(default)
    return model.eval(), s, kind, is_diffusers


def dit_inputs(s: DiTShape, batch: int, device: str, dtype: torch.dtype, diffusers: bool) -> dict:
    gen = torch.Generator(device=device).manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(batch, s.in_channels, s.latent, s.latent, generator=gen, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(batch, s.text_tokens, s.caption_channels, generator=gen, device=device, dtype=dtype),
        "timestep": torch.full((batch,), 500, device=device),
    }  # fmt: skip
    if diffusers:
        inputs["return_dict"] = False
    return inputs


# -- driver -----------------------------------------------------------------------------------


def compare(name, batch, model, inputs, config, args, rows) -> None:
    stamp = StampCompiler(config, kernel=args.kernel)
    base_fn, base_compile = cold_compile(model, inputs, "inductor", args.device)
    base_ms = time_ms(lambda: base_fn(**inputs), device=args.device, repeat=args.repeat)
    stamp_fn, stamp_compile = cold_compile(model, inputs, stamp, args.device)
    stamp_ms = time_ms(lambda: stamp_fn(**inputs), device=args.device, repeat=args.repeat)
    sites = sum(len(r.plan.sites) for r in stamp.records)
    rows.append(
        [name, batch, sites, base_ms, stamp_ms, stamp_ms / base_ms,
         base_compile, stamp_compile, stamp_compile / base_compile]
    )  # fmt: skip
    print(rows[-1], flush=True)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="triton", help="stamp lowering (see stamp_fx.lowering)")
    parser.add_argument("--layers", type=int, default=None, help="Llama layers (default: auto)")
    parser.add_argument("--seq", type=int, default=None, help="Llama prefill length (2048)")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--dit-batch", type=int, default=1)
    parser.add_argument("--dit-layers", type=int, default=None, help="DiT blocks (28)")
    parser.add_argument(
        "--workloads", nargs="*", default=["llama", "dit"], choices=["llama", "dit"]
    )
    parser.add_argument("--repeat", type=int, default=None)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    args.repeat = args.repeat or (3 if args.quick else 10)
    rows: list[list] = []
    notes = {}
    torch.set_grad_enabled(False)

    if "llama" in args.workloads:
        layers = args.layers or default_layers(args.device, dtype)
        seq = args.seq or (64 if args.quick else 2048)
        model = llama_stack(layers, quick=args.quick, device=args.device, dtype=dtype)
        # Small models in --quick get a smaller high-precision band so the Haar has levels.
        config = StampConfig(high_tokens=8) if args.quick else StampConfig()
        for batch in args.batches:
            ids = torch.randint(0, 128, (batch, seq), device=args.device)
            inputs = {"input_ids": ids, "use_cache": False}
            compare(f"llama x{layers} S={seq}", batch, model, inputs, config, args, rows)
        notes["llama"] = f"{layers} layers, {dtype}"
        del model

    if "dit" in args.workloads:
        model, shape, kind, is_diffusers = dit_model(
            quick=args.quick, device=args.device, dtype=dtype, layers=args.dit_layers
        )
        inputs = dit_inputs(shape, args.dit_batch, args.device, dtype, is_diffusers)
        config = StampConfig(high_tokens=8) if args.quick else StampConfig()
        tokens = (shape.latent // shape.patch) ** 2
        compare(
            f"DiT {shape.layers} blocks, {tokens} tokens",
            args.dit_batch,
            model,
            inputs,
            config,
            args,
            rows,
        )
        notes["dit"] = kind

    emit(
        f"end to end, stamp (kernel={args.kernel}) vs inductor; DiT: {notes.get('dit', '-')}",
        ["workload", "batch", "sites", "inductor ms", "stamp ms", "latency ratio",
         "inductor compile s", "stamp compile s", "compile ratio"],
        rows,
        device=args.device,
        json_path=args.json,
        extra={"notes": notes},
    )  # fmt: skip


if __name__ == "__main__":
    main()
