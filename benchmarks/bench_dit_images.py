"""A diffusers PixArt DiT with RANDOM weights (no pretrained DiT is available offline) fed with
latents made from real images (skimage.data): SQNR of the output versus the float model for
identity, haar and haar2d (and each with the Hadamard feature transform), W16A4 with 64-channel
groups like the paper's image experiments. Random weights: these numbers show how the
transforms treat real image statistics, not what a trained PixArt would do.

    python -m benchmarks.bench_dit_images --quick
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks.harness import base_parser, emit
from stamp_fx import sqnr_db
from stamp_fx.evaluation import Method, average_bits, compile_method

IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat")


def latents(side: int, names=IMAGES) -> torch.Tensor:
    """[N, 4, side, side]: RGB + luminance of each image, resized and standardised."""
    from skimage import data

    out = []
    for name in names:
        img = torch.as_tensor(getattr(data, name)(), dtype=torch.float32) / 255.0
        img = img[..., None].expand(*img.shape, 3) if img.ndim == 2 else img[..., :3]
        rgb = img.permute(2, 0, 1)[None]
        rgb = F.interpolate(
            rgb, size=(side, side), mode="bilinear", antialias=True, align_corners=False
        )[0]
        lum = rgb.mean(0, keepdim=True)
        x = torch.cat([rgb, lum])
        out.append((x - x.mean()) / x.std())
    return torch.stack(out)


def build(side: int, layers: int, seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=side, patch_size=2, in_channels=4, out_channels=8, num_layers=layers,
        num_attention_heads=4, attention_head_dim=32, cross_attention_dim=128, caption_channels=64,
        norm_type="ada_norm_single", use_additional_conditions=False,
    ).eval()  # fmt: skip


@torch.no_grad()
def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64, help="latent side (tokens = (side/2)**2)")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    if args.quick:
        args.side, args.layers = 32, 2
    grid = (args.side // 2, args.side // 2)
    model = build(args.side, args.layers)
    x = latents(args.side, IMAGES[:2] if args.quick else IMAGES)
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(x.shape[0], 16, 64, generator=gen)
    inputs = {
        "hidden_states": x,
        "encoder_hidden_states": text,
        "timestep": torch.full((x.shape[0],), 500),
        "return_dict": False,
    }
    reference = model(**inputs)[0]
    common = {"high_tokens": 64, "group_size": 64, "sink_tokens": 0}
    rows = [
        Method(
            "A4 RTN (64-ch groups)", {"transform": "identity", "high_tokens": 0, "group_size": 64}
        ),
        Method("A4 + first 64 raw at 8", {"transform": "identity", **common}),
        Method("STaMP haar", {"transform": "haar", **common}),
        Method("STaMP haar2d", {"transform": "haar2d", "grid": grid, **common}),
        Method("STaMP dct", {"transform": "dct", **common}),
    ]
    rows += [
        Method(m.name + " +H", {**m.options, "feature_transform": "hadamard"}) for m in list(rows)
    ]
    table = []
    for method in rows:
        compiled, compiler = compile_method(model, method, inductor=False)
        out = compiled(**inputs)[0]
        bits = average_bits(compiler.last.plan, compiler.last.sites, grid[0] * grid[1])
        table.append([method.name, round(bits, 4), round(sqnr_db(reference, out), 2)])
        print(f"  {method.name}: {table[-1][2]} dB", file=sys.stderr)
    emit(
        f"PixArt DiT, RANDOM weights, {args.layers} layers, {grid[0]}x{grid[1]} tokens, latents from {x.shape[0]} skimage images",
        ["method", "avg act bits", "output SQNR dB (random-weight)"],
        table,
        device="cpu",
        json_path=args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
