"""Every linear is found however it is written (hand-written modules, no Inductor): the site
keys, that quantization happened, and equality with the eager reference application."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stamp_fx import StampCompiler, StampConfig, apply_plan_eager
from tests.tolerances import F32_REORDER_TOL, QUANTIZED_DIFFERS_ATOL

D = 8


class SubclassLinear(nn.Linear):
    """An nn.Linear subclass with its own forward, as some real architectures write it."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class FunctionalLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D) / D**0.5)
        self.bias = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class MatmulTransposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D) / D**0.5)  # [out, in]

    def forward(self, x):
        return torch.matmul(x, self.weight.t())


class Einsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D) / D**0.5)  # [out, in]

    def forward(self, x):
        return torch.einsum("bsd,ed->bse", x, self.weight)


class AddmmFlattened(nn.Module):
    """GPT-2's Conv1D: addmm on the flattened input, weight stored [in, out]."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D) / D**0.5)
        self.bias = nn.Parameter(torch.randn(D))

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], D)


class Bmm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D) / D**0.5)  # [in, out]

    def forward(self, x):
        return torch.bmm(x, self.weight.unsqueeze(0).expand(x.shape[0], D, D))


class Block(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return x + self.proj(torch.tanh(x))


class Stack(nn.Module):
    def __init__(self, *projs):
        super().__init__()
        self.layers = nn.ModuleList(Block(p) for p in projs)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _compile(model, x, **config):
    compiler = StampCompiler(StampConfig(high_tokens=2, low_bits=3, **config), inductor=False)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=compiler, fullgraph=True)(x)
    return out, compiler


def _reference(model, x, plan):
    handles = apply_plan_eager(model, plan)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(
    "proj",
    [
        SubclassLinear(D, D),
        FunctionalLinear(),
        MatmulTransposed(),
        Einsum(),
        AddmmFlattened(),
        Bmm(),
    ],
    ids=lambda p: type(p).__name__,
)
def test_linear_written_any_way_is_a_site_and_matches_the_reference(proj):
    torch.manual_seed(0)
    model = Stack(proj).eval()
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(1))
    out, compiler = _compile(model, x)
    assert [s.key for s in compiler.last.sites] == ["layers.0.proj:in"]
    assert set(compiler.last.plan.sites) == {"layers.0.proj:in"}
    with torch.no_grad():
        assert not torch.allclose(
            out, model(x), atol=QUANTIZED_DIFFERS_ATOL
        )  # quantization happened
    torch.testing.assert_close(out, _reference(model, x, compiler.last.plan), **F32_REORDER_TOL)


class FlattenedMLP(nn.Module):
    """The parent flattens to [batch*seq, features] (through a transpose of the leading axes)
    before the linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        b, s, d = x.shape
        h = x.transpose(0, 1).contiguous().reshape(s * b, d)
        return self.fc(h).view(s, b, d).transpose(0, 1)


def test_linear_on_a_flattened_input_is_traced_to_its_sequence_through_a_chain():
    model = Stack(FlattenedMLP()).eval()
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(1))
    out, compiler = _compile(model, x)
    (site,) = compiler.last.sites
    assert site.key == "layers.0.proj.fc:in" and site.reason is None
    assert site.shape == ("2", "6", str(D)) and site.seq_dim == 1 and len(site.chain) == 3
    # The same as quantizing the [batch, seq, features] tensor along its sequence axis.
    policy = compiler.last.plan.sites[site.key]
    with torch.no_grad():
        fc = model.layers[0].proj.fc
        t = torch.tanh(x)
        q = policy.apply(t, 1).transpose(0, 1).reshape(-1, D)
        expected = x + fc(q).view(6, 2, D).transpose(0, 1)
        assert not torch.allclose(out, model(x), atol=QUANTIZED_DIFFERS_ATOL)
    torch.testing.assert_close(out, expected, **F32_REORDER_TOL)


class WeightOnTheLeft(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(6, 6))

    def forward(self, x):
        return torch.matmul(self.mix, x)  # mixes tokens: not a linear over the features


def test_unrecognised_matmul_on_a_parameter_warns_naming_it():
    model = Stack(WeightOnTheLeft()).eval()
    x = torch.randn(2, 6, D)
    with pytest.warns(
        UserWarning,
        match=r"stamp: 1 matmul-like call\(s\) on parameters are not recognised as linear layers "
        r"and run unquantized: layers.0.proj \(matmul\)",
    ):
        out, compiler = _compile(model, x)
    assert compiler.last.sites == []
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


class FlattenedGeluMLP(nn.Module):
    """Both MLP linears see [batch*seq, features]; the second one's input comes out of the first
    through an activation, so no [batch, seq, 2*features] tensor exists in the graph."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)

    def forward(self, x):
        b, s, d = x.shape
        return self.fc2(F.gelu(self.fc1(x.reshape(-1, d)))).view(b, s, d)


@pytest.mark.parametrize("dynamic", [False, True])
def test_every_linear_of_a_flattened_mlp_is_quantized_along_the_sequence(dynamic):
    model = Stack(FlattenedGeluMLP()).eval()
    gen = torch.Generator().manual_seed(1)
    compiler = StampCompiler(StampConfig(high_tokens=2, low_bits=3), inductor=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=compiler, fullgraph=True, dynamic=dynamic)
    for batch, seq in ((2, 6), (3, 5)):
        x = torch.randn(batch, seq, D, generator=gen)
        with torch.no_grad():
            out = compiled(x)
        plan = compiler.last.plan
        assert set(plan.sites) == {"layers.0.proj.fc1:in", "layers.0.proj.fc2:in"}
        mlp = model.layers[0].proj
        with torch.no_grad():
            t = torch.tanh(x)
            h = mlp.fc1(plan.sites["layers.0.proj.fc1:in"].apply(t, 1).reshape(-1, D))
            h = F.gelu(h).view(batch, seq, 2 * D)
            q = plan.sites["layers.0.proj.fc2:in"].apply(h, 1).reshape(-1, 2 * D)
            expected = x + mlp.fc2(q).view(batch, seq, D)
            assert not torch.allclose(out, model(x), atol=QUANTIZED_DIFFERS_ATOL)
        torch.testing.assert_close(out, expected, **F32_REORDER_TOL)
    assert len(compiler.records) == (1 if dynamic else 2)
    (fc2,) = [s for s in compiler.last.sites if s.key == "layers.0.proj.fc2:in"]
    assert fc2.unflatten is not None and fc2.seq_dim == 1
