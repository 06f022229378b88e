"""The per-process cache of torch's tensor-access analysis of user Triton kernels
(lowering/kernel_analysis.py): registered kernels are analysed once per distinct launch
signature, everything else goes to torch every time."""

import pytest
import torch

pytest.importorskip("triton")
wrap = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")

from stamp_fx.lowering import kernel_analysis  # noqa: E402


class Calls(list):
    name: str


class FakeKernel:
    """Stands in for a JITFunction: the cache keys kernels by identity only."""


@pytest.fixture(params=["identify_accessed_tensors", "identify_mutated_tensors"])
def counting_analysis(request, monkeypatch):
    """torch's analysis replaced by a counting one, under its name in torch 2.12+ or 2.11."""
    calls = Calls()

    def analysis(kernel, kwargs, tma_descriptor_metadata):
        calls.append((kernel, dict(kwargs)))
        return {"writes": sorted(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))}

    for name in kernel_analysis._ANALYSES:
        monkeypatch.delattr(wrap, name, raising=False)
    monkeypatch.setattr(wrap, request.param, analysis, raising=False)
    monkeypatch.setattr(kernel_analysis, "_cache", {})
    calls.name = request.param
    return calls


def test_repeated_launches_are_analysed_once(counting_analysis):
    kernel = FakeKernel()
    assert kernel_analysis.memoize_access_analysis(kernel)
    analyse = getattr(wrap, counting_analysis.name)
    kwargs = {"x_ptr": torch.zeros(2), "out_ptr": torch.zeros(2), "rows": 3, "MODE": 2}
    first = analyse(kernel, kwargs, {})
    again = analyse(kernel, {**kwargs, "x_ptr": torch.ones(5)}, {})  # other data, same signature
    assert first == again == {"writes": ["out_ptr", "x_ptr"]}
    assert first is not again  # callers never share one result object
    assert len(counting_analysis) == 1
    analyse(kernel, {**kwargs, "MODE": 3}, {})  # another constant: another kernel body
    analyse(kernel, {**kwargs, "x_ptr": torch.zeros(2, dtype=torch.bfloat16)}, {})
    assert len(counting_analysis) == 3


def test_other_kernels_and_tma_launches_go_to_torch(counting_analysis):
    ours, theirs = FakeKernel(), FakeKernel()
    kernel_analysis.memoize_access_analysis(ours)
    analyse = getattr(wrap, counting_analysis.name)
    kwargs = {"x_ptr": torch.zeros(2)}
    for _ in range(2):
        analyse(theirs, kwargs, {})
        analyse(ours, kwargs, {"x_ptr": ("experimental", ([2], [2], 4))})
    assert len(counting_analysis) == 4


def test_installing_twice_wraps_once(counting_analysis):
    kernel_analysis.memoize_access_analysis(FakeKernel())
    wrapped = getattr(wrap, counting_analysis.name)
    kernel_analysis.memoize_access_analysis(FakeKernel())
    assert getattr(wrap, counting_analysis.name) is wrapped
