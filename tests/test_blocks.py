"""The GGUF block GEMMs (blocks.py, kernels.cpp): weights made as llama.cpp quantises them are found
again bit for bit, anything else is refused, and the kernel's output is the exact weights' product in
fp32, with every row the same whatever the number of rows beside it."""

import pytest
import torch

from workers.engine.runtime import blocks, kernels

pytestmark = pytest.mark.skipif(kernels.unavailable() is not None, reason=f"block kernels do not run here: {kernels.unavailable()}")


def q4_1_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """weight quantised to Q4_1 and de-quantised as llama.cpp and gguf-py do (float32)."""
    v = weight.float().reshape(weight.shape[0], -1, 32)
    low, high = v.min(-1, keepdim=True).values, v.max(-1, keepdim=True).values
    d = (high - low) / 15
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.floor((v - low) * inverse + 0.5).clamp(0, 15)
    return (d.half().float() * q + low.half().float()).reshape(weight.shape)


def q8_0_round_trip(weight: torch.Tensor) -> torch.Tensor:
    v = weight.float().reshape(weight.shape[0], -1, 32)
    d = v.abs().max(-1, keepdim=True).values / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.round(v * inverse).clamp(-127, 127)
    return (d.half().float() * q).reshape(weight.shape)


def as_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Every linear layer's weights made Q4_1 blocks (the head Q8_0), as in a de-quantised GGUF."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            round_trip = q8_0_round_trip if name == "lm_head" else q4_1_round_trip
            module.weight.data = round_trip(module.weight.data)
    return model


@pytest.fixture(scope="module", params=kernels.runnable())  # AVX-512: another order of sums, the same rules
def lib(tmp_path_factory, request):
    return kernels.build(tmp_path_factory.mktemp("kernels"), request.param)


def test_derive_finds_the_blocks_again_and_refuses_other_weights():
    torch.manual_seed(0)
    weight = torch.randn(7, 96) * 0.05
    weight[2, :32] = 0.25  # a constant block (d = 0)
    q4 = blocks.derive(q4_1_round_trip(weight))
    assert q4 is not None and q4.kind == "q4_1" and q4.shape == (7, 96)
    assert q4.nbytes() < weight.numel()  # under a byte a weight, with its scales
    q8 = blocks.derive(q8_0_round_trip(weight))
    assert q8 is not None and q8.kind == "q8_0"
    assert blocks.derive(weight) is None  # fp32 weights are neither
    assert blocks.derive(q4_1_round_trip(weight)[:, :80].contiguous()) is None  # not a whole number of blocks
    assert blocks.derive(q4_1_round_trip(weight).double()) is None


@pytest.mark.parametrize("round_trip", [q4_1_round_trip, q8_0_round_trip])
def test_kernel_is_the_exact_weights_product_and_rows_do_not_depend_on_the_batch(lib, round_trip):
    torch.manual_seed(1)
    weight = round_trip(torch.randn(7, 128) * 0.05)  # 7 outputs: passes of 2, 3, 4, 6 or 8 channels end in a partial one
    found = blocks.derive(weight)
    assert found is not None
    x = torch.randn(17, 128)
    out = blocks.matmul(lib, x, found)
    torch.testing.assert_close(out.double(), x.double() @ weight.double().T, atol=2e-6, rtol=1e-6)
    for rows in range(1, 18):  # one row alone, and in calls of other sizes (registers up to 7 rows, then tiles of
        # 3 or 6 rows and every remainder): the same bits
        for start in range(0, 17 - rows + 1, rows):
            assert torch.equal(blocks.matmul(lib, x[start:start + rows], found), out[start:start + rows])


@pytest.mark.parametrize("in_features", [1536, 4096])
def test_wide_calls_in_row_chunks_give_every_row_the_bits_it_has_alone(lib, in_features):
    """Hundreds of rows (a prefill) run in chunks of rows that fit a core's cache; a row's bits stay those it
    gets alone or in a one-chunk call (the chunk sizes differ with the input width)."""
    torch.manual_seed(3)
    weight = q4_1_round_trip(torch.randn(10, in_features) * 0.05)
    found = blocks.derive(weight)
    x = torch.randn(301, in_features)
    out = blocks.matmul(lib, x, found)
    for start, rows in ((0, 1), (7, 1), (299, 1), (0, 9), (40, 48), (100, 201)):
        assert torch.equal(blocks.matmul(lib, x[start:start + rows], found), out[start:start + rows])


def test_concat_stacks_outputs(lib):
    torch.manual_seed(2)
    parts = [q4_1_round_trip(torch.randn(n, 64)) for n in (4, 2, 2)]
    joined = blocks.concat([blocks.derive(p) for p in parts])
    x = torch.randn(3, 64)
    assert torch.equal(blocks.matmul(lib, x, joined), torch.cat([blocks.matmul(lib, x, blocks.derive(p)) for p in parts], 1))
    assert blocks.concat([blocks.derive(parts[0]), blocks.derive(q8_0_round_trip(parts[1]))]) is None


def test_the_instruction_set_can_be_forced_and_a_wrong_one_is_refused(monkeypatch):
    monkeypatch.setenv("DARE_KERNELS_ISA", "avx2")
    assert kernels.isa() == "avx2" and "-mavx512f" not in kernels.flags()
    forced = kernels.digest()
    monkeypatch.setenv("DARE_KERNELS_ISA", "sse2")
    with pytest.raises(kernels.KernelBuildError, match="expected auto, avx2 or avx512"):
        kernels.isa()
    monkeypatch.setenv("DARE_KERNELS_ISA", "auto")
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert kernels.isa() == "avx512" and kernels.digest() != forced  # cost curves are not shared between the builds
    else:
        monkeypatch.setenv("DARE_KERNELS_ISA", "avx512")
        with pytest.raises(kernels.KernelBuildError, match="this CPU offers"):
            kernels.isa()
