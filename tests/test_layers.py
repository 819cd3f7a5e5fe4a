import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp

from models.layers import GroupNorm, LabelEmbedder, TimestepEmbedder, attention, timestep_embedding


def test_group_norm_matches_torch_and_has_a_forward_derivative():
    norm = GroupNorm(4, 8).double()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(norm(x), F.group_norm(x, 4, norm.weight, norm.bias, norm.eps))
    v = torch.randn_like(x)
    _, tangent = jvp(norm, (x,), (v,))
    eps = 1e-6
    torch.testing.assert_close(tangent, (norm(x + eps * v) - norm(x - eps * v)) / (2 * eps), rtol=1e-5, atol=1e-6)


def test_attention_matches_sdpa_and_has_a_forward_derivative():
    q, k, v = (torch.randn(2, 3, 7, 4, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    dq = torch.randn_like(q)
    _, tangent = jvp(lambda q: attention(q, k, v), (q,), (dq,))
    eps = 1e-6
    fd = (attention(q + eps * dq, k, v) - attention(q - eps * dq, k, v)) / (2 * eps)
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-7)


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
