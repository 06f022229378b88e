"""What does STaMP cost end to end, as users run it? backend="stamp" vs backend="inductor".

Two workloads with random weights (the cost does not depend on the values):

* prefill of a Llama-3-8B-shaped decoder stack (transformers ``LlamaConfig``: hidden 4096,
  intermediate 14336, 32 heads, 8 KV heads, vocab 128 so the LM head does not dominate), bf16,
  every batch in ``--batches`` (1 4) x every length in ``--seqs`` (2048); as many layers as fit
  comfortably (``--layers``, default: the real 32 while the weights take at most a quarter of
  the free GPU memory);
* one denoising step of a PixArt-Sigma-shaped DiT (28 blocks, hidden 1152 = 16 heads x 72,
  MLP 4608, 4096 image tokens from a 128 x 128 latent with patch 2, i.e. a 64 x 64 token grid,
  cross-attention to 300 text tokens of width 4096), bf16, batch ``--dit-batch``. It is
  diffusers' ``PixArtTransformer2DModel`` when diffusers is installed, else an equivalent
  stack written here in plain PyTorch (F.linear + SDPA self- and cross-attention with the same
  shapes, adaLN-single modulation); the table says which.

One row per (workload, batch, length, configuration). Configurations are the options users
pass, ``torch.compile(model, backend="stamp", options=...)`` exactly (``--configs`` for Llama,
``--dit-configs`` for the DiT):

* ``none``: ``{}`` (no options);
* ``hadamard``: ``{"feature_transform": "hadamard"}`` (the accurate setting);
* ``hadamard_kv``: ``{"feature_transform": "hadamard", "quantize_kv": True}``;
* ``haar2d_hadamard`` (the DiT's default row): ``{"transform": "haar2d", "grid": (64, 64),
  "feature_transform": "hadamard"}``, the grid being the model's token grid. Sites whose
  sequence is not that grid (the cross-attention K/V projections of the 300 text tokens) get the
  plan's own rule: text K/V projections are quantized per token without a sequence transform
  (stamp_fx/planner.py), and any other site whose static length does not fill the grid is left
  unquantized with that reason (the ``sites`` column counts quantized sites only).

The stamp side uses the library's default lowering unless ``--lowering`` names one (then it is
added to the options as ``"lowering"``). In ``--quick`` every configuration also gets
``high_tokens=8`` so the tiny sequences have Haar levels.

Columns: quantized sites; median latency of the inductor baseline and of stamp
(``harness.time_ms``: ``triton.testing.do_bench`` median on CUDA, no CUDA graphs) and their
ratio; the cold compile time of each (fresh Dynamo state, Inductor caches off and a new cache
directory; in ``--quick`` the Inductor cache is shared across the run, so later compiles are
warm: CPU C++ compiles would not fit otherwise) and their ratio; ``SQNR dB``: the compiled stamp
model's output against the eager fake-quant model of the same configuration (the same backend
with ``inductor=False``: the rewritten graph run eagerly with the reference ops), i.e. proof that
the compiled code computes the same thing (``stamp_fx.sqnr_db``, 10 log10(|ref|^2 / |out - ref|^2)
in float64, inf when equal); ``float dB``: the same measure for the inductor baseline against the
eager float model, the float-rounding floor of that comparison. One inductor baseline is
compiled and timed per (workload, batch, length) and shared by its configuration rows. Targets
(issue 11): latency ratio <= 1.05 (Llama), <= 1.10 (DiT haar2d + Hadamard), compile ratio <= 1.5.

    python -m benchmarks.bench_e2e --quick        # tiny models, about a minute on a CPU
    python -m benchmarks.bench_e2e --workloads llama --batches 1 --json e2e_llama_b1.json
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.harness import base_parser, default_lowering, emit, time_ms
from stamp_fx import StampCompiler, StampConfig, sqnr_db

CONFIGS = {
    "none": {},
    "hadamard": {"feature_transform": "hadamard"},
    "hadamard_kv": {"feature_transform": "hadamard", "quantize_kv": True},
    "haar2d_hadamard": {"transform": "haar2d", "grid": None, "feature_transform": "hadamard"},
}
"""Options per configuration name; ``grid: None`` is filled with the workload's token grid."""


def config_options(name: str, *, grid: tuple[int, int] | None, quick: bool) -> dict:
    options = dict(CONFIGS[name])
    if "grid" in options:
        if grid is None:
            raise SystemExit(f"config {name!r} needs a token grid; only the DiT has one")
        options["grid"] = grid
    if quick:
        options["high_tokens"] = 8  # tiny sequences: a smaller 8-bit band so the Haar has levels
    return options


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def first_tensor(out) -> torch.Tensor:
    """The model's main output (Llama logits, the DiT's noise prediction)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    return out.logits if hasattr(out, "logits") else first_tensor(out.to_tuple())


class Compiles:
    """Compiles from cold (fresh Dynamo state, Inductor caches off, a new cache directory) or,
    with ``warm``, with one Inductor cache directory shared by every compile of the run."""

    def __init__(self, device: str, *, warm: bool):
        self.device, self.warm = device, warm
        self.dirs: list[str] = []

    def _cache_dir(self) -> str:
        if not (self.warm and self.dirs):
            self.dirs.append(tempfile.mkdtemp(prefix="stamp_e2e_"))
        return self.dirs[-1]

    def cleanup(self) -> None:
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)

    def compile(self, model: nn.Module, inputs: dict, **compile_kwargs):
        """(compiled, seconds of the first call, its output)."""
        torch._dynamo.reset()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = self._cache_dir()
        compiled = torch.compile(model, **compile_kwargs)
        patch = (
            contextlib.nullcontext()
            if self.warm
            else torch._inductor.config.patch(force_disable_caches=True)
        )
        with torch.no_grad(), patch:
            start = time.perf_counter()
            out = compiled(**inputs)
            _sync(self.device)
            seconds = time.perf_counter() - start
        return compiled, seconds, first_tensor(out).float()


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


def measure(label, batch, model, inputs, names, grid, args, compiles, rows, used) -> None:
    """One inductor baseline (compiled and timed once), then every configuration in ``names``."""
    eager = first_tensor(model(**inputs)).float()
    base_fn, base_compile, base_out = compiles.compile(model, inputs, backend="inductor")
    base_ms = time_ms(lambda fn=base_fn: fn(**inputs), device=args.device, repeat=args.repeat)
    floor = sqnr_db(eager, base_out)
    del base_fn, base_out, eager
    for name in names:
        options = config_options(name, grid=grid, quick=args.quick)
        timed = {**options, **({"lowering": args.lowering} if args.lowering else {})}
        used[f"{label.split()[0]} {name}"] = timed
        stamp_fn, stamp_compile, out = compiles.compile(
            model, inputs, backend="stamp", options=timed
        )
        stamp_ms = time_ms(lambda fn=stamp_fn: fn(**inputs), device=args.device, repeat=args.repeat)
        del stamp_fn
        # The eager fake-quant model of the same configuration: the reference ops, no Inductor.
        reference = StampCompiler(StampConfig(**options), inductor=False)
        torch._dynamo.reset()
        with torch.no_grad():
            ref = first_tensor(torch.compile(model, backend=reference)(**inputs)).float()
        sites = sum(len(r.plan.sites) for r in reference.records)
        rows.append(
            [label, batch, name, sites, base_ms, stamp_ms, stamp_ms / base_ms,
             base_compile, stamp_compile, stamp_compile / base_compile, sqnr_db(ref, out), floor]
        )  # fmt: skip
        print(
            " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in rows[-1]), flush=True
        )
        if args.json is not None:  # partial results survive a run cut short (device time limits)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"partial": True, "rows": rows}, default=str))
        del out, ref
    torch._dynamo.reset()


def parse_args():
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--lowering", "--kernel", dest="lowering", default=None,
        help="stamp lowering, added to the options as 'lowering' (default: the library's default)",
    )  # fmt: skip
    parser.add_argument(
        "--configs", nargs="*", default=["none", "hadamard", "hadamard_kv"],
        choices=["none", "hadamard", "hadamard_kv"], help="Llama configurations",
    )  # fmt: skip
    parser.add_argument(
        "--dit-configs", nargs="*", default=["none", "haar2d_hadamard"], choices=sorted(CONFIGS),
        help="DiT configurations",
    )  # fmt: skip
    parser.add_argument("--layers", type=int, default=None, help="Llama layers (default: auto)")
    parser.add_argument(
        "--seqs", type=int, nargs="*", default=None, help="Llama prefill lengths (2048)"
    )
    parser.add_argument("--batches", type=int, nargs="*", default=None, help="Llama (1 4)")
    parser.add_argument("--dit-batch", type=int, default=1)
    parser.add_argument("--dit-layers", type=int, default=None, help="DiT blocks (28)")
    parser.add_argument(
        "--workloads", nargs="*", default=["llama", "dit"], choices=["llama", "dit"]
    )
    parser.add_argument("--repeat", type=int, default=None)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # --quick: a warm Inductor cache shared by the run's compiles (see Compiles).
    compiles = Compiles(args.device, warm=args.quick)
    try:
        run(args, compiles)
    finally:
        compiles.cleanup()


def run(args, compiles: Compiles) -> None:
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    args.repeat = args.repeat or (3 if args.quick else 10)
    # --quick: one layer / block, batch 1 and a warm Inductor cache, so the CPU run takes about
    # a minute (each cold C++ compile of even a tiny model takes 15-30 s on two cores).
    batches = args.batches or ([1] if args.quick else [1, 4])
    seqs = args.seqs or ([64] if args.quick else [2048])
    if args.quick and args.device == "cpu":
        # A shared two-core machine: no compile worker pool to start, no OpenMP spinning.
        torch._inductor.config.compile_threads = 1
        torch.set_num_threads(1)
    rows: list[list] = []
    notes, used = {}, {}
    torch.set_grad_enabled(False)

    if "llama" in args.workloads:
        layers = args.layers or (1 if args.quick else default_layers(args.device, dtype))
        model = llama_stack(layers, quick=args.quick, device=args.device, dtype=dtype)
        for seq in seqs:
            for batch in batches:
                ids = torch.randint(0, 128, (batch, seq), device=args.device)
                inputs = {"input_ids": ids, "use_cache": False}
                label = f"llama x{layers} S={seq}"
                measure(label, batch, model, inputs, args.configs, None, args, compiles, rows, used)
        notes["llama"] = f"{layers} layers, {dtype}, LlamaForCausalLM (vocab 128), logits compared"
        del model

    if "dit" in args.workloads:
        dit_layers = args.dit_layers or (1 if args.quick else None)
        model, shape, kind, is_diffusers = dit_model(
            quick=args.quick, device=args.device, dtype=dtype, layers=dit_layers
        )
        inputs = dit_inputs(shape, args.dit_batch, args.device, dtype, is_diffusers)
        side = shape.latent // shape.patch
        label = f"DiT x{shape.layers} {side}x{side} tokens"
        names = args.dit_configs
        measure(
            label, args.dit_batch, model, inputs, names, (side, side), args, compiles, rows, used
        )
        notes["dit"] = f"{kind}, {shape.layers} blocks, {dtype}, {shape.text_tokens} text tokens"

    kernel = args.lowering or f"{default_lowering()} (the default)"
    compile_kind = "warm shared Inductor cache (--quick)" if args.quick else "cold"
    emit(
        f"end to end, backend='stamp' (kernel {kernel}) vs 'inductor'; compiles {compile_kind}; "
        f"DiT: {notes.get('dit', '-')}",
        ["workload", "batch", "config", "sites", "inductor ms", "stamp ms", "latency ratio",
         "inductor compile s", "stamp compile s", "compile ratio", "SQNR dB", "float dB"],
        rows,
        device=args.device,
        json_path=args.json,
        extra={"notes": notes, "options": used},
    )  # fmt: skip
    for key, options in used.items():
        print(f"- {key}: options={options}")


if __name__ == "__main__":
    main()
