"""FLatten focused linear attention and the FLatten models (nas_headprune.models.flatten)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timm.layers import Mlp  # noqa: E402
from timm.models.swin_transformer import WindowAttention  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from nas_headprune.errors import ArchitectureError, CheckpointError, UnknownNameError, UsageError  # noqa: E402
from nas_headprune.models import flatten as fl  # noqa: E402  (registers the models with timm)
from nas_headprune.models.factory import create_model  # noqa: E402
from nas_headprune.models.flatten import (  # noqa: E402
    EPS,
    FocusedLinearAttention,
    FocusedSwinBlock,
    convert_official_state_dict,
    focus,
    load_official_checkpoint,
)

# its module fixtures are built once: the whole module runs on one worker under -n 2
pytestmark = pytest.mark.xdist_group("flatten_models")


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Every parameter random (biases, positional encoding, scale and DWC bias included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module.eval()


def make_fla(**kw) -> FocusedLinearAttention:
    args = dict(dim=24, num_heads=3, grid_size=(4, 5), kernel_size=3)
    args.update(kw)
    return FocusedLinearAttention(**args)


def expected_macs(m: FocusedLinearAttention) -> dict[str, int]:
    """Per-image MACs of the brief's formula, split by the op that carries them."""
    T, C, H = m.num_tokens, m.dim, m.num_heads
    d_qk, d_v, k = m.head_dim_qk, m.head_dim_v, m.kernel_size
    grid = m.grid_size[0] * m.grid_size[1]
    return {
        "linear": T * C * H * (2 * d_qk + d_v) + T * H * d_v * C,
        "matmul": 2 * H * T * d_qk * d_v + H * T * d_qk,
        "conv": grid * H * d_v * k * k,
    }


def reference(m: FocusedLinearAttention, x: torch.Tensor) -> torch.Tensor:
    """Quadratic-order focused attention, written from the formula: A = phi(Q) phi(K)^T per head,
    O = A V / (rowsum(A) + T * eps) + DWC(V), with the DWC computed head by head."""
    B, T, _ = x.shape
    H, d_qk, d_v, P = m.num_heads, m.head_dim_qk, m.head_dim_v, m.num_prefix_tokens
    gh, gw = m.grid_size
    qkv = F.linear(x, m.qkv.weight, m.qkv.bias)
    q, k, v = qkv[..., : H * d_qk], qkv[..., H * d_qk : 2 * H * d_qk], qkv[..., 2 * H * d_qk :]
    k = k + m.positional_encoding
    s = F.softplus(m.scale)
    phi_q = focus((q.clamp_min(0) + EPS) / s, m.focusing_factor)
    phi_k = focus((k.clamp_min(0) + EPS) / s, m.focusing_factor)
    outs = []
    for h in range(H):
        qh = phi_q[..., h * d_qk : (h + 1) * d_qk]
        kh = phi_k[..., h * d_qk : (h + 1) * d_qk]
        vh = v[..., h * d_v : (h + 1) * d_v]
        A = qh @ kh.transpose(1, 2)  # (B, T, T)
        o = A @ vh / (A.sum(-1, keepdim=True) + T * EPS)
        img = vh[:, P:].reshape(B, gh, gw, d_v).permute(0, 3, 1, 2)
        if m.dwc_kernels == "shared":
            w, b = m.dwc.weight, m.dwc.bias
        else:
            w, b = m.dwc.weight[h * d_v : (h + 1) * d_v], m.dwc.bias[h * d_v : (h + 1) * d_v]
        conv = F.conv2d(img, w, b, padding=m.kernel_size // 2, groups=d_v)
        conv = conv.permute(0, 2, 3, 1).reshape(B, gh * gw, d_v)
        o = o + torch.cat([torch.zeros(B, P, d_v, dtype=x.dtype), conv], dim=1)
        outs.append(o)
    return F.linear(torch.cat(outs, dim=-1), m.proj.weight, m.proj.bias)


# --------------------------------------------------------------------------------------------- module


def test_focus_keeps_norm_and_pulls_to_the_largest_axis() -> None:
    x = torch.rand(50, 12) + 0.01
    y = focus(x, 3)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    axis = F.one_hot(x.argmax(-1), 12).float()
    assert (F.cosine_similarity(y, axis) > F.cosine_similarity(x, axis)).all()
    assert torch.equal(focus(torch.zeros(2, 5), 3), torch.zeros(2, 5))


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(num_prefix_tokens=1),
        dict(head_dim_qk=5, head_dim_v=3, dwc_kernels="per_channel"),
        dict(head_dim_qk=6, head_dim_v=9, dwc_kernels="per_channel", num_prefix_tokens=2, focusing_factor=2),
    ],
)
def test_matches_quadratic_reference(kw: dict) -> None:
    m = randomize(make_fla(**kw)).double()
    x = torch.randn(2, m.num_tokens, 24, dtype=torch.float64)
    out = m(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference(m, x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # dense, shared DWC
        dict(head_dim_qk=5, head_dim_v=3, dwc_kernels="per_channel"),  # pruned shape
        dict(head_dim_qk=7, head_dim_v=2, dwc_kernels="per_channel", num_prefix_tokens=1),
    ],
)
def test_flop_counter_sees_exactly_the_formula(kw: dict) -> None:
    m = randomize(make_fla(**kw))
    batch = 3
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(torch.randn(batch, m.num_tokens, 24))
    by_op = {
        str(op).removeprefix("aten."): n // (2 * batch)
        for op, n in counter.get_flop_counts()["Global"].items()
    }
    want = expected_macs(m)
    # the Linear layers run as addmm / mm, the three attention products as bmm, the DWC as a convolution
    assert by_op.pop("convolution") == want["conv"]
    assert by_op.pop("bmm") == want["matmul"]
    assert sum(by_op.values()) == want["linear"]
    assert set(by_op) <= {"addmm", "mm"}
    assert counter.get_total_flops() == 2 * batch * sum(want.values())


def slice_to_pruned(
    dense: FocusedLinearAttention, keep_qk: torch.Tensor, keep_v: torch.Tensor
) -> FocusedLinearAttention:
    """Hand surgery: keep channels ``keep_qk[h]`` / ``keep_v[h]`` of every head; per-channel DWC."""
    H, d = dense.num_heads, dense.head_dim_qk
    C = H * d
    flat_qk = (torch.arange(H)[:, None] * d + keep_qk).reshape(-1)  # (H*d_qk',) in "(h d)" order
    flat_v = (torch.arange(H)[:, None] * dense.head_dim_v + keep_v).reshape(-1)
    rows = torch.cat([flat_qk, C + flat_qk, 2 * C + flat_v])
    new = FocusedLinearAttention(
        dense.dim, H, dense.grid_size, focusing_factor=dense.focusing_factor, kernel_size=dense.kernel_size,
        head_dim_qk=keep_qk.shape[1], head_dim_v=keep_v.shape[1], dwc_kernels="per_channel",
        num_prefix_tokens=dense.num_prefix_tokens,
    ).eval()  # fmt: skip
    with torch.no_grad():
        new.qkv.weight.copy_(dense.qkv.weight[rows])
        new.qkv.bias.copy_(dense.qkv.bias[rows])
        new.positional_encoding.copy_(dense.positional_encoding[..., flat_qk])
        new.scale.copy_(dense.scale[..., flat_qk])
        new.dwc.weight.copy_(dense.dwc.weight[keep_v.reshape(-1)])  # shared kernel j -> (h, j)
        new.dwc.bias.copy_(dense.dwc.bias[keep_v.reshape(-1)])
        new.proj.weight.copy_(dense.proj.weight[:, flat_v])
        new.proj.bias.copy_(dense.proj.bias)
        if dense.q_gamma is not None:
            new.enable_q_gamma().copy_(dense.q_gamma[flat_qk])
    return new


@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("q_gamma", [False, True])
def test_masked_dense_equals_sliced_pruned(prefix: int, q_gamma: bool) -> None:
    torch.manual_seed(prefix + 2 * q_gamma)
    H, d = 3, 8
    dense = randomize(make_fla(dim=H * d, num_heads=H, grid_size=(5, 4), num_prefix_tokens=prefix), seed=7)
    if q_gamma:
        with torch.no_grad():
            dense.enable_q_gamma().copy_(torch.rand(H * d) + 0.5)
    keep_qk = torch.stack([torch.randperm(d)[:5].sort().values for _ in range(H)])  # distinct per head
    keep_v = torch.stack([torch.randperm(d)[:3].sort().values for _ in range(H)])
    assert not all(torch.equal(keep_qk[0], row) for row in keep_qk)  # heads keep different channels
    pruned = slice_to_pruned(dense, keep_qk, keep_v)

    qk_mask = torch.zeros(H, d).scatter_(1, keep_qk, 1.0)
    v_mask = torch.zeros(H, d).scatter_(1, keep_v, 1.0)
    dense.qk_mask, dense.v_mask = qk_mask, v_mask
    x = torch.randn(4, dense.num_tokens, H * d)
    with torch.no_grad():
        masked, sliced = dense(x), pruned(x)
        dense.qk_mask = dense.v_mask = None
        unmasked = dense(x)
    assert (masked - sliced).abs().max() < 1e-5
    assert (masked - unmasked).abs().max() > 1e-2  # the masks did remove something


def test_shared_dwc_equals_replicated_per_channel() -> None:
    shared = randomize(make_fla(num_prefix_tokens=1))
    per = make_fla(num_prefix_tokens=1, dwc_kernels="per_channel").eval()
    state = shared.state_dict()
    state["dwc.weight"] = state["dwc.weight"].repeat(3, 1, 1, 1)  # (H*d_v, 1, k, k), "(h d)"
    state["dwc.bias"] = state["dwc.bias"].repeat(3)
    per.load_state_dict(state)
    x = torch.randn(2, shared.num_tokens, 24)
    with torch.no_grad():
        torch.testing.assert_close(per(x), shared(x))


def test_soft_masks_pass_gradients() -> None:
    m = randomize(make_fla())
    m.qk_mask = torch.full((3, 8), 0.7, requires_grad=True)
    m.v_mask = torch.full((8,), 0.4, requires_grad=True)  # broadcast over heads
    m(torch.randn(2, m.num_tokens, 24)).square().sum().backward()
    for mask in (m.qk_mask, m.v_mask):
        assert mask.grad is not None and torch.isfinite(mask.grad).all() and mask.grad.abs().sum() > 0


def test_bad_inputs_raise() -> None:
    m = make_fla()
    m.qk_mask = torch.ones(4, 8)
    with pytest.raises(ArchitectureError, match="qk_mask"):
        m(torch.randn(1, m.num_tokens, 24))
    m.qk_mask = None
    with pytest.raises(UsageError, match="20 tokens"):
        m(torch.randn(1, 21, 24))
    with pytest.raises(UsageError, match="dwc_kernels"):
        make_fla(dwc_kernels="per_head")
    # the Swin shift mask is accepted and ignored, as where a timm WindowAttention stands
    x = torch.randn(1, m.num_tokens, 24)
    assert torch.equal(m(x, mask=torch.zeros(1, 20, 20)), m(x))


# --------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def mnist_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: timm.create_model(name).eval() for name in ("flatten_swin_mnist", "flatten_deit_mnist")}


def test_mnist_models_build_run_and_train(mnist_models: dict[str, torch.nn.Module]) -> None:
    for name, model in mnist_models.items():
        assert sum(p.numel() for p in model.parameters()) < 1_000_000, name
        x = torch.randn(2, 1, 28, 28)
        out = model(x)
        assert out.shape == (2, 10)
        out.sum().backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        model.zero_grad(set_to_none=True)
        mlps = [m for m in model.modules() if type(m).__name__ == "Mlp"]
        assert mlps and all(type(m) is Mlp for m in mlps)


def test_mnist_swin_has_both_attention_kinds(mnist_models: dict[str, torch.nn.Module]) -> None:
    model = mnist_models["flatten_swin_mnist"]
    s1, s2 = model.layers
    assert [type(b) for b in s1.blocks] == [FocusedSwinBlock, FocusedSwinBlock]
    assert all(b.attn.grid_size == (14, 14) and b.attn.num_prefix_tokens == 0 for b in s1.blocks)
    assert all(type(b.attn) is WindowAttention and b.attn.window_size == (7, 7) for b in s2.blocks)
    deit = mnist_models["flatten_deit_mnist"]
    assert all(type(b.attn) is FocusedLinearAttention for b in deit.blocks)
    assert deit.blocks[0].attn.grid_size == (7, 7) and deit.blocks[0].attn.num_tokens == 50


def test_mnist_models_focused_layers_cost_the_formula(mnist_models: dict[str, torch.nn.Module]) -> None:
    for model in mnist_models.values():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 1, 28, 28))
        counts = counter.get_flop_counts()
        root = type(model).__name__
        layers = {n: m for n, m in model.named_modules() if isinstance(m, FocusedLinearAttention)}
        assert layers
        for name, m in layers.items():
            assert sum(counts[f"{root}.{name}"].values()) == 2 * sum(expected_macs(m).values()), name


def test_factory_kwargs_and_project_factory() -> None:
    model = create_model("flatten_swin_mnist", num_classes=7, drop_path_rate=0.1, dwc_kernels="per_channel")
    assert model.nas_headprune_base["name"] == "flatten_swin_mnist"
    assert model.head.fc.out_features == 7
    assert model.layers[0].blocks[0].attn.dwc.weight.shape == (48, 1, 5, 5)
    assert model.layers[0].blocks[1].drop_path1.drop_prob > 0
    deit = timm.create_model("flatten_deit_mnist", img_size=32, in_chans=3, kernel_size=3, focusing_factor=2)
    assert deit.blocks[0].attn.grid_size == (8, 8) and deit.blocks[0].attn.kernel_size == 3
    assert deit(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(UsageError, match="load_official_checkpoint"):
        timm.create_model("flatten_deit_mnist", pretrained=True)


# ImageNet sizes against the FLatten paper (Fig. 6): params within 3%, MACs within 5%
PARAMS_TOL, MACS_TOL = 0.03, 0.05


@pytest.fixture(scope="module")
def imagenet_sizes() -> dict[str, tuple[int, int, torch.nn.Module]]:
    """Built on the meta device: exact parameter and FlopCounterMode counts, no arithmetic."""
    out = {}
    for name in fl.PAPER_FIGURES:
        with torch.device("meta"):
            model = timm.create_model(name).eval()
        params = sum(p.numel() for p in model.parameters())
        out[name] = (params, fl.count_macs(model, (3, 224, 224)), model)
    return out


@pytest.mark.parametrize("name", [n for n, fig in fl.PAPER_FIGURES.items() if fig is not None])
def test_imagenet_sizes_match_paper(imagenet_sizes: dict, name: str) -> None:
    params, macs, _ = imagenet_sizes[name]
    paper_params, paper_macs = fl.PAPER_FIGURES[name]
    assert abs(params / paper_params - 1) < PARAMS_TOL, (name, params)
    assert abs(macs / paper_macs - 1) < MACS_TOL, (name, macs)


def test_flatten_swin_structure(imagenet_sizes: dict) -> None:
    model = imagenet_sizes["flatten_swin_tiny"][2]
    grids = [(56, 56), (28, 28)]
    for stage, grid in zip(model.layers[:2], grids, strict=True):
        assert all(type(b) is FocusedSwinBlock and b.attn.grid_size == grid for b in stage.blocks)
        assert all(b.attn.kernel_size == 5 and b.attn.focusing_factor == 3 for b in stage.blocks)
    for stage in model.layers[2:]:
        assert all(type(b.attn) is WindowAttention and b.attn.window_size == (7, 7) for b in stage.blocks)
    assert [b.shift_size for b in model.layers[2].blocks[:2]] == [(0, 0), (3, 3)]  # shifted windows
    assert model.layers[3].blocks[1].shift_size == (0, 0)  # 7x7 map: one window, no shift


def test_flatten_deit_small_is_deit_small_plus_focused_parts(imagenet_sizes: dict) -> None:
    """No paper figure for FLatten-DeiT-S: check it against timm's DeiT-S, analytically."""
    params, macs, model = imagenet_sizes["flatten_deit_small"]
    with torch.device("meta"):
        base = timm.create_model("deit_small_patch16_224").eval()
    for m in base.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False  # FlopCounterMode counts CPU SDPA as 0
    depth, T, C, H, d, k = 12, 197, 384, 6, 64, 5
    extra_params = depth * (T * C + C + d * k * k + d)  # positional encoding, scale, shared DWC
    assert params == sum(p.numel() for p in base.parameters()) + extra_params
    softmax = H * T * T * (d + d)
    linear = 2 * H * T * d * d + H * T * d + (T - 1) * H * d * k * k  # no DWC on the class token
    assert macs == fl.count_macs(base, (3, 224, 224)) + depth * (linear - softmax)
    assert model.blocks[0].attn.num_prefix_tokens == 1


# --------------------------------------------------------------------------------------------- checkpoints


class TrainConfig:
    """Stands for the yacs config object the official checkpoints carry."""

    epochs = 300


def to_official_swin(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Inverse of the conversion: downsample back to the end of the previous stage, ``head.fc`` to
    ``head``, and the buffers the official code saves."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("layers.") and ".downsample." in key:
            i = int(key.split(".")[1])
            key = key.replace(f"layers.{i}.downsample.", f"layers.{i - 1}.downsample.", 1)
        out[key.replace("head.fc.", "head.")] = value.clone()
    for name, m in model.named_modules():
        if isinstance(m, WindowAttention):
            out[f"{name}.relative_position_index"] = m.relative_position_index.clone()
    return out


def to_official_split_qkv(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A DeiT state dict with split ``attn.q`` / ``attn.kv`` projections and a DDP prefix."""
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            prefix, kind = key.rsplit("qkv.", 1)
            c = value.shape[0] // 3
            out[f"module.{prefix}q.{kind}"] = value[:c].clone()
            out[f"module.{prefix}kv.{kind}"] = value[c:].clone()
        else:
            out[f"module.{key}"] = value.clone()
    return out


@pytest.mark.parametrize(
    "name, to_official, wrap",
    [
        ("flatten_swin_mnist", to_official_swin, "model"),
        ("flatten_deit_mnist", to_official_split_qkv, "state_dict"),
    ],
)
def test_official_checkpoint_round_trip(tmp_path, name, to_official, wrap) -> None:
    source = randomize(timm.create_model(name), seed=1, std=0.1)
    path = tmp_path / "official.pth"
    official = to_official(source)
    assert set(official) != set(source.state_dict())  # really a different layout
    torch.save({wrap: official, "epoch": 300}, path)
    target = randomize(timm.create_model(name), seed=2, std=0.1)
    assert load_official_checkpoint(target, path) is target
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_checkpoint_mismatch_names_keys(tmp_path) -> None:
    model = timm.create_model("flatten_swin_mnist")
    official = to_official_swin(model)
    del official["layers.0.blocks.1.attn.positional_encoding"]
    official["layers.0.blocks.1.attn.agent_bias"] = torch.zeros(3)
    torch.save(official, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_official_checkpoint(model, tmp_path / "bad.pth")
    assert "layers.0.blocks.1.attn.positional_encoding" in str(err.value)
    assert "layers.0.blocks.1.attn.agent_bias" in str(err.value)

    other = timm.create_model("flatten_deit_mnist", embed_dim=32)
    torch.save(other.state_dict(), tmp_path / "small.pth")
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_official_checkpoint(timm.create_model("flatten_deit_mnist"), tmp_path / "small.pth")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_official_checkpoint(model, tmp_path / "missing.pth")
    # the official training script pickles its config next to the weights: refused, with a way out
    torch.save({"model": model.state_dict(), "config": TrainConfig()}, tmp_path / "with_config.pth")
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_official_checkpoint(model, tmp_path / "with_config.pth")


def test_convert_passes_our_layout_through_and_rejects_other_models() -> None:
    sd = timm.create_model("flatten_swin_mnist").state_dict()
    assert convert_official_state_dict(sd, "flatten_swin_mnist").keys() == sd.keys()
    with pytest.raises(UnknownNameError, match="flatten_pvt_tiny"):
        convert_official_state_dict(sd, "flatten_pvt_tiny")
