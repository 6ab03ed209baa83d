"""ops/adamw/foreach.py against ops/adamw/reference.py: several steps on tensors of mixed shapes, with
and without weight decay (norm weights get none)."""

from __future__ import annotations

import torch

from train_engine_0_5b.ops.adamw import foreach, reference


def test_foreach_matches_reference_over_steps():
    shapes = [(17, 5), (5,), (3, 4, 2), (1,)]
    params = [torch.randn(s) for s in shapes]
    state = {impl: ([p.clone() for p in params], [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes])
             for impl in (reference.adamw, foreach.adamw)}
    wds = [0.1 if len(s) >= 2 else 0.0 for s in shapes]
    for step in range(1, 6):
        grads = [torch.randn(s) * 10.0 ** torch.randint(-3, 2, ()).item() for s in shapes]
        lr = 1e-3 * step
        for impl, (ps, ms, vs) in state.items():
            impl(ps, grads, ms, vs, step=step, lr=lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decays=wds)
    (p_ref, m_ref, v_ref), (p_fe, m_fe, v_fe) = state.values()
    for a, b in zip(p_ref + m_ref + v_ref, p_fe + m_fe + v_fe):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert not torch.equal(p_ref[0], params[0])  # it moved
