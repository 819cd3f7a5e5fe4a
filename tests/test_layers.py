import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp

from models.layers import GroupNorm, LabelEmbedder, TimestepEmbedder, jvp_safe_kernels, timestep_embedding


def test_group_norm_is_torchs_with_fp32_statistics_and_a_forward_derivative():
    norm = GroupNorm(4, 8).double()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(norm(x), F.group_norm(x, 4, norm.weight, norm.bias, norm.eps))
    v = torch.randn_like(x)
    _, tangent = jvp(norm, (x,), (v,))  # the fused kernel's own forward-mode rule
    eps = 1e-6
    torch.testing.assert_close(tangent, (norm(x + eps * v) - norm(x - eps * v)) / (2 * eps), rtol=1e-5, atol=1e-6)
    half = norm.float()(x.float().bfloat16())
    assert half.dtype == torch.bfloat16  # statistics in fp32, the result back in the input's dtype
    torch.testing.assert_close(half.float(), norm.float()(x.float().bfloat16().float()), rtol=0.02, atol=0.02)


def test_sdpa_has_a_forward_derivative_inside_jvp_safe_kernels():
    q, k, v = (torch.randn(2, 3, 7, 4, dtype=torch.float64) for _ in range(3))
    dq = torch.randn_like(q)

    def attend(q):
        return F.scaled_dot_product_attention(q, k, v)

    with jvp_safe_kernels():
        out, tangent = jvp(attend, (q,), (dq,))
    torch.testing.assert_close(out, attend(q))  # the math backend computes what the fused kernel does
    eps = 1e-6
    torch.testing.assert_close(tangent, (attend(q + eps * dq) - attend(q - eps * dq)) / (2 * eps), rtol=1e-5, atol=1e-7)


def test_timestep_embedding_shapes_and_odd_dims():
    t = torch.rand(5)
    assert timestep_embedding(t, 256).shape == (5, 256)
    assert timestep_embedding(t, 7).shape == (5, 7)
    assert TimestepEmbedder(32)(t).shape == (5, 32)


def test_label_embedder_null_class_for_missing_cond():
    emb = LabelEmbedder(10, 16)
    none = emb(None, 4, torch.device("cpu"))
    torch.testing.assert_close(none, emb.table.weight[10].expand(4, 16))
    labels = torch.tensor([0, 3])
    torch.testing.assert_close(emb(labels, 2, torch.device("cpu")), emb.table.weight[labels])
    with pytest.raises(IndexError):
        emb(torch.tensor([11]), 1, torch.device("cpu"))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_group_norm_inside_jvp_safe_kernels_is_the_fused_one_written_out(layout):
    norm = GroupNorm(4, 8).double()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64).contiguous(memory_format=layout)
    v = torch.randn_like(x)
    fused_out, fused_tangent = jvp(norm, (x,), (v,))
    with jvp_safe_kernels():
        out, tangent = jvp(norm, (x,), (v,))
    torch.testing.assert_close(out, fused_out)
    torch.testing.assert_close(tangent, fused_tangent)
