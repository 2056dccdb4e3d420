"""Variants, their exact sizes, the creation options, and inputs of any size."""

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import debiformer
from debiformer.errors import UserError
from debiformer.model import DeformableBiLevelRoutingAttention, Mlp
from debiformer.routing import RegionGrid, implementation, recording
from tests.helpers.cuda_autocast import CudaAutocastPolicy
from tests.helpers.recipes import SMALL_BACKBONE

EXACT_PARAMETERS = {
    "debiformer_tiny": 21_495_598,
    "debiformer_small": 44_008_028,
    "debiformer_base": 95_501_926,
}


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param(name, expected, marks=pytest.mark.slow)
        if name == "debiformer_base"
        else (name, expected)
        for name, expected in EXACT_PARAMETERS.items()
    ],
)
def test_parameter_counts_match_the_release(name, expected):
    assert _count(debiformer.create_model(name)) == expected


def test_options_reach_the_model():
    model = debiformer.create_model(
        "debiformer_nano", num_classes=7, in_chans=1, drop_path_rate=0.2, depths=[1, 1, 1, 1]
    )
    assert model.head.out_features == 7
    assert model.stem[0].in_channels == 1
    assert model.arch.depths == (1, 1, 1, 1)
    rates = [
        block.drop_path.drop_prob
        for stage in model.stages
        for block in stage
        if hasattr(block.drop_path, "drop_prob")
    ]
    assert rates and max(rates) == pytest.approx(0.2)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_timm_builds_the_variants():
    model = timm.create_model("debiformer_tiny", num_classes=5)
    assert isinstance(model, debiformer.DeBiFormer)
    assert model.head.out_features == 5


def test_unknown_names_are_one_line_errors():
    with pytest.raises(UserError, match="unknown model 'debiformer_huge'"):
        debiformer.create_model("debiformer_huge")
    with pytest.raises(UserError, match="unknown key 'dimz'"):
        debiformer.create_model("debiformer_nano", dimz=(1, 2, 3, 4))
    with pytest.raises(UserError, match=r"depths: expected 4 values \(one per stage\)"):
        debiformer.create_model("debiformer_nano", depths=(1, 1))


def test_stage_maps_are_four_strided_maps():
    model = debiformer.create_model("debiformer_nano").eval()
    with torch.no_grad():
        features = model.stage_maps(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in features] == [
        (32, 16, 24),
        (64, 8, 12),
        (128, 4, 6),
        (256, 2, 3),
    ]


@pytest.mark.parametrize("size", [(224, 224), (256, 256), (320, 480), (97, 131)])
def test_tiny_accepts_any_size(size):
    model = debiformer.create_model("debiformer_tiny").eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, *size))
    assert logits.shape == (1, 1000)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (61, 40), (128, 75)])
def test_nano_accepts_small_and_odd_sizes_and_trains(size):
    model = debiformer.create_model("debiformer_nano", num_classes=10)
    logits = model(torch.randn(2, 3, *size))
    logits.sum().backward()
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("attention", ["attn1", "attn2"])
def test_attention_pads_to_the_region_grid_and_crops_back(attention):
    """On a map the region grid does not divide, each attention equals itself run on the
    explicitly zero-padded map, cropped back."""
    block = debiformer.create_model("debiformer_tiny").eval().stages[0][0]
    module = getattr(block, attention)
    x = torch.randn(1, 50, 53, 64)
    with torch.no_grad():
        output = module(x)
        padded = module(torch.nn.functional.pad(x, (0, 0, 0, 3, 0, 6)))
    assert output.shape == (1, 50, 53, 64)
    torch.testing.assert_close(output, padded[:, :50, :53])


def test_attentions_record_the_geometry_they_compute(monkeypatch):
    """Within `recording`, BRA and DBRA hand over the region grid of their padded input, DBRA its
    reference points, the agent positions its grid_sample reads and its agent map's grid; the
    outputs stay those of a pass without recording."""
    block = debiformer.create_model("debiformer_tiny").eval().stages[0][0]
    torch.nn.init.zeros_(block.attn2.offset_net[-1].weight)  # agents at their reference points
    sampled = []
    real_sample = DeformableBiLevelRoutingAttention._sample

    def sample(module, x, positions):
        sampled.append(positions)
        return real_sample(module, x, positions)

    monkeypatch.setattr(DeformableBiLevelRoutingAttention, "_sample", sample)
    x = torch.randn(1, 50, 53, 64)
    for module in (block.attn1, block.attn2):
        records = {}
        with torch.no_grad():
            plain = module(x)
            with recording(lambda name, value, records=records: records.setdefault(name, value)):
                recorded = module(x)
        assert torch.equal(plain, recorded)
        assert records["region_grid"] == RegionGrid((50, 53), (56, 56), 7)
        assert records["region_index"].shape == (1, 49, module.topk)
    positions, reference = records["agent_positions"], records["reference_points"]
    assert torch.equal(positions, sampled[-1])
    agents_h, agents_w = reference.shape[:2]
    centres_y = ((torch.arange(agents_h) + 0.5) / agents_h * 2 - 1).view(-1, 1).expand(-1, agents_w)
    torch.testing.assert_close(reference[..., 0], centres_y)
    torch.testing.assert_close(positions, reference.expand_as(positions))
    padded = tuple(-(-side // 7) * 7 for side in (agents_h, agents_w))
    assert records["agent_grid"] == RegionGrid((agents_h, agents_w), padded, 7)


def test_wrong_input_channels_is_a_one_line_error():
    model = debiformer.create_model("debiformer_nano")
    with pytest.raises(UserError, match=r"expected images of shape \(N, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))


def test_macs_match_the_release_at_224():
    """Counted with the release's routed attention, the multiply-accumulates equal the spec's."""
    model = debiformer.create_model("debiformer_tiny").eval()
    with implementation("reference"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 224, 224))
    assert counter.get_total_flops() / 2 == pytest.approx(2.636e9, rel=5e-4)


@pytest.mark.parametrize("stages", [(1, 2, 3, 4), (1, 3)])
def test_grad_checkpointing_saves_less_and_gives_the_same_gradients(stages):
    torch.manual_seed(0)
    model = debiformer.create_model("debiformer_nano", num_classes=10)
    images = torch.randn(2, 3, 40, 40, requires_grad=True)
    gradients, saved_bytes = [], []
    for enable in (False, True):
        model.set_grad_checkpointing(enable, stages=stages)
        model.zero_grad()
        images.grad = None
        saved = {}

        def pack(tensor, saved=saved):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = model(images)
        output.square().sum().backward()
        saved_bytes.append(sum(saved.values()))
        gradients.append([images.grad.clone()] + [p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*gradients, strict=True):
        torch.testing.assert_close(recomputed, plain)
    plain_bytes, checkpointed_bytes = saved_bytes
    assert checkpointed_bytes < 0.8 * plain_bytes


def test_grad_checkpointing_rejects_unknown_stages():
    model = debiformer.create_model("debiformer_nano")
    with pytest.raises(UserError, match=r"stages must be 1-4, got \[0, 5\]"):
        model.set_grad_checkpointing(stages=(0, 5))


@pytest.mark.parametrize("size", [(9, 11), (2, 3)])  # (2, 3): smaller than the 3×3 kernel
def test_mlp_saves_one_hidden_map_and_matches_the_plain_composition(size):
    """The training MLP recomputes its depthwise conv and GELU in the backward pass: same
    outputs and gradients (input and every parameter) as the plain layers, and only the input
    and the expanded map are kept for the backward pass."""
    torch.manual_seed(0)
    mlp = Mlp(16, 3).double()
    x = torch.randn(2, *size, 16, dtype=torch.double, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        output = mlp(x)
    hidden = mlp.fc1(x)
    conv = torch.nn.Conv2d.forward(mlp.dwconv, hidden.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    plain = mlp.fc2(torch.nn.functional.gelu(hidden + conv))
    torch.testing.assert_close(output, plain)
    upstream = torch.randn_like(output)
    inputs = [x, *mlp.parameters()]
    for ours, reference in zip(
        torch.autograd.grad(output, inputs, upstream),
        torch.autograd.grad(plain, inputs, upstream),
        strict=True,
    ):
        torch.testing.assert_close(ours, reference)
    weights = {parameter.data_ptr() for parameter in mlp.parameters()}
    activations = {t.data_ptr(): t.numel() for t in saved if t.data_ptr() not in weights}
    assert sum(activations.values()) == x.numel() * (1 + 3)


def test_the_attentions_depthwise_convolutions_compute_in_fp32_under_bf16_autocast():
    attention = DeformableBiLevelRoutingAttention(
        64,
        2,
        7,
        4,
        offset_groups=2,
        offset_kernel=5,
        offset_stride=2,
        agent_mlp_ratio=3,
        rpe_size=7,
    )
    torch.manual_seed(0)
    values = torch.randn(2, 14, 14, 64).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lepe = attention.lepe(values)
        plain = torch.nn.Conv2d.forward(attention.lepe, values.permute(0, 3, 1, 2))
    assert lepe.dtype == torch.bfloat16 and plain.dtype == torch.bfloat16
    in_fp32 = torch.nn.Conv2d.forward(attention.lepe, values.float().permute(0, 3, 1, 2))
    assert torch.equal(lepe, in_fp32.permute(0, 2, 3, 1).to(torch.bfloat16))
    assert not torch.equal(lepe, plain.permute(0, 2, 3, 1))  # autocast alone: a bf16 conv


def test_a_bf16_training_step_under_cudas_autocast_policy_differentiates_every_parameter():
    """CUDA computes softmax (and norms, sums) in fp32 under autocast and differentiates outside
    it: the routed attention's own backward pass must not meet fp32 beside bf16 there (emulated
    on the CPU by `CudaAutocastPolicy`; the slot-by-slot path runs at 64² with this backbone)."""
    torch.manual_seed(0)
    model = debiformer.create_model("debiformer_nano", num_classes=4, **SMALL_BACKBONE).train()
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    with CudaAutocastPolicy(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.softmax(images.bfloat16(), dim=-1).dtype == torch.float32  # the policy holds
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(grad is not None and grad.isfinite().all() for grad in grads.values()), [
        name for name, grad in grads.items() if grad is None or not grad.isfinite().all()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_torch_compile_captures_the_model_in_one_graph_under_bf16_autocast(mode):
    """A graph break in every attention made compiled inference slower than eager on a GPU."""
    model = debiformer.create_model("debiformer_nano", num_classes=4, **SMALL_BACKBONE)
    model.train(mode == "train")
    with torch.set_grad_enabled(mode == "train"), torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert (explanation.graph_count, explanation.break_reasons) == (1, [])
