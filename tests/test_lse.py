"""core.lse: chunked cross-entropy equals log_softmax over the whole row, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from fedit.core.lse import soft_cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_log_softmax(dtype):
    torch.manual_seed(0)
    N, k, d, V = 7, 3, 16, 1000
    W = torch.randn(V, d).to(dtype)
    h = torch.randn(N + k, d, requires_grad=True)
    tok = torch.randint(0, V, (N,))
    p0 = F.softmax(torch.randn(k, V) * 2, -1)
    toks = torch.cat([tok, torch.full((k,), -1)])
    got = soft_cross_entropy(h, W, toks, p0, chunk=128)  # chunks that do not divide V
    g = torch.randn(N + k)
    (got * g).sum().backward()
    grad_got = h.grad.clone()
    h.grad = None
    logp = F.log_softmax((h.to(dtype) @ W.T).float(), -1)
    want = torch.cat([-logp[:N].gather(1, tok[:, None])[:, 0], -(p0 * logp[N:]).sum(-1)])
    (want * g).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert torch.allclose(got, want, **tol)
    assert torch.allclose(grad_got, h.grad, **tol)


def test_rows_and_distributions_must_match():
    with pytest.raises(ValueError, match="distributions"):
        soft_cross_entropy(torch.randn(3, 4), torch.randn(10, 4), torch.tensor([1, -1, -1]), torch.rand(1, 10))
