"""backend="auto": the choice per device type and shape, and its one warning, with the
availability of each backend pretended (so the CUDA choices are tested on a CPU too)."""
import dataclasses
import warnings

import pytest
import torch

from capsrouting import backends, info

PAPER_U = torch.empty(1, 1152, 8, device="meta")
PAPER_W = torch.empty(1152, 10, 16, 8, device="meta")


@pytest.fixture
def pretend(monkeypatch):
    """pretend(reasons, device_types): override availability reasons and device types of backends."""

    def apply(reasons=None, device_types=None):
        current = {name: backends.unavailable_reason(name) for name in backends.backend_report()}
        current.update(reasons or {})
        monkeypatch.setattr(backends, "_reasons", current)
        registry = dict(backends._REGISTRY)
        for name, types in (device_types or {}).items():
            registry[name] = dataclasses.replace(registry[name], device_types=lambda types=types: types)
        monkeypatch.setattr(backends, "_REGISTRY", registry)
        monkeypatch.setattr(backends, "_announced", set())

    return apply


def _choose(device_type, x=PAPER_U, W=PAPER_W):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name = backends.choose_automatically(device_type, x, W).name
    return name, [str(w.message) for w in caught if "capsrouting" in str(w.message)]


GPU_READY = dict(reasons={"triton": None, "cuda": None}, device_types={"triton": ("cuda",)})


def test_cuda_tensors_get_triton_when_everything_is_there(pretend):
    pretend(**GPU_READY)
    assert _choose("cuda") == ("triton", [])
    # route's predictions (B, I, J, D) take the same path; the shape checks read them without W.
    assert _choose("cuda", torch.empty(1, 1152, 10, 16, device="meta"), None) == ("triton", [])


def test_cuda_tensors_without_triton_get_the_cuda_kernels_with_one_warning(pretend):
    pretend(reasons={"triton": "triton is not installed (pretend)", "cuda": None})
    name, messages = _choose("cuda")
    assert name == "cuda"
    assert messages == ["capsrouting: using backend 'cuda' for cuda tensors ('triton': triton is not installed (pretend))"]
    assert _choose("cuda") == ("cuda", [])  # once per process and choice


def test_more_than_64_output_capsules_fall_back_to_the_reference_on_cuda(pretend):
    pretend(**GPU_READY)
    x = torch.empty(2, 30, 65, 16, device="meta")
    name, [message] = _choose("cuda", x, None)
    assert name == "torch"
    assert "'triton': the triton backend supports J <= 64" in message and "'cuda': the cuda backend supports J <= 64" in message


def test_float64_beyond_the_triton_register_budget_goes_to_the_cuda_kernels(pretend):
    pretend(**GPU_READY)
    name, [message] = _choose("cuda", torch.empty(2, 30, 64, 32, dtype=torch.float64, device="meta"), None)
    assert name == "cuda" and "float64 up to 1024" in message


def test_sizes_past_the_triton_kernels_32_bit_offsets_go_to_the_cuda_kernels(pretend):
    """The Triton kernels address W, and the samples of a batch tile from its first, with 32-bit offsets."""
    pretend(**GPU_READY)
    huge_W = torch.empty(2**21, 16, 16, 4, device="meta")  # 2**31 elements
    name, [message] = _choose("cuda", torch.empty(2, 2**21, 4, device="meta"), huge_W)
    assert name == "cuda" and "W with fewer than 2**31 elements; got 2147483648" in message
    # 2**27 elements per sample (I x J x Dout of route's predictions); one fewer is taken.
    backends._announced.clear()  # the choice warns once
    name, [message] = _choose("cuda", torch.empty(2, 2**19, 16, 16, device="meta"), None)
    assert name == "cuda" and "fewer than 134217728 elements per sample; got 134217728" in message
    assert _choose("cuda", torch.empty(2, 2**19 - 1, 16, 16, device="meta"), None)[0] == "triton"


def test_cpu_tensors_get_the_extension_at_any_size(pretend):
    pretend(reasons={"cpu": None})
    assert _choose("cpu") == ("cpu", [])
    assert _choose("cpu", torch.empty(2, 30, 70, 40, device="meta"), None) == ("cpu", [])


def test_cpu_tensors_without_the_extension_get_the_reference_with_one_warning(pretend):
    pretend(reasons={"cpu": "compiling the C++ extension just in time failed (pretend)"})
    name, messages = _choose("cpu")
    assert name == "torch" and len(messages) == 1 and "failed (pretend)" in messages[0]
    assert _choose("cpu") == ("torch", [])


def test_the_triton_interpreter_is_never_chosen_automatically(pretend):
    pretend(reasons={"triton": None, "cpu": "off (pretend)"}, device_types={"triton": ("cpu",)})
    assert _choose("cpu")[0] == "torch"


def test_info_names_the_automatic_choice_for_each_device_type(pretend):
    pretend(**GPU_READY)
    lines = info.auto_choices(["cpu", "cuda"])
    assert lines[1] == "backend='auto' runs 'triton' for cuda tensors (paper layer)"
    pretend(reasons={"triton": "triton is not installed (pretend)", "cuda": None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert info.auto_choices(["cuda"]) == ["backend='auto' runs 'cuda' for cuda tensors (paper layer)"]
